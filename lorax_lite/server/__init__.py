"""HTTP server: the native LoRAX/TGI API over an AsyncLLM (`create_app`)."""

from lorax_lite.server.app import create_app

__all__ = ["create_app"]
