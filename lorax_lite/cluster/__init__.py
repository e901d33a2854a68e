"""Several replicas behind one endpoint on Ray Serve (an optional extra: `pip install 'lorax-lite[cluster]'`):
routing.py runs in Ray's HTTP proxy, deployment.py on each replica, launch.py in `lorax-lite serve`."""
