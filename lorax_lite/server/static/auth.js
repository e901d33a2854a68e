// The API key page. A server with API keys answers its HTML pages with this form (status 401) until the
// request carries a key. The key is kept in this tab (sessionStorage); with it, this script fetches the page
// with `Authorization: Bearer KEY` and puts the answer's <main> in place of the form, and does the same
// for links between the chat pages and for Back/Forward, so the form is not shown again.
"use strict";

(() => {
  const STORAGE = "lorax_api_key";
  const main = document.querySelector("main");
  const section = document.getElementById("key");
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const submit = document.getElementById("key-submit");
  const errorBox = document.getElementById("key-error");
  const keyTitle = document.title;

  function showForm(message) {
    if (!section.isConnected) main.replaceChildren(section); // a page was shown in its place
    document.title = keyTitle;
    section.hidden = false;
    submit.disabled = false;
    errorBox.textContent = message || "";
    errorBox.hidden = !message;
    input.focus();
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      const error = body.error;
      return error && typeof error === "object" ? error.message : String(error || body.detail || response.statusText);
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  // Shows `doc`'s <main> in this page's; scripts inserted as HTML do not run, so each gets a fresh element.
  function swap(doc) {
    document.title = doc.title;
    main.replaceChildren(...doc.querySelector("main").childNodes);
    for (const old of main.querySelectorAll("script[src]")) {
      const script = document.createElement("script");
      script.src = old.getAttribute("src");
      old.replaceWith(script);
    }
  }

  // Fetches `url` with the stored key and shows it; `push`: a new history entry (a link), else the same one.
  async function show(url, push) {
    let response;
    try {
      response = await fetch(url, { headers: { Authorization: `Bearer ${sessionStorage.getItem(STORAGE)}` } });
    } catch {
      showForm("The server cannot be reached.");
      return;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(STORAGE);
      showForm("That key was not accepted.");
      return;
    }
    const isHtml = (response.headers.get("content-type") || "").startsWith("text/html");
    const doc = isHtml ? new DOMParser().parseFromString(await response.text(), "text/html") : null;
    if (!doc || !doc.querySelector("main")) {
      showForm(isHtml ? `${response.status} ${response.statusText}` : await errorMessage(response));
      return;
    }
    swap(doc);
    if (push) {
      history.pushState(null, "", response.url);
      window.scrollTo(0, 0);
    } else if (response.url !== location.href) {
      history.replaceState(null, "", response.url); // redirected (/ -> /chat)
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    sessionStorage.setItem(STORAGE, key);
    input.value = "";
    submit.disabled = true;
    errorBox.textContent = ""; // the last key's error is not this one's
    errorBox.hidden = true;
    show(location.href, false);
  });

  document.addEventListener("click", (event) => {
    const link = event.target.closest('a[href^="/chat"], header.top a');
    if (!link || !sessionStorage.getItem(STORAGE) || event.defaultPrevented) return;
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    if (new URL(link.href).origin !== location.origin) return;
    event.preventDefault();
    show(link.href, true);
  });

  window.addEventListener("popstate", () => {
    if (sessionStorage.getItem(STORAGE)) show(location.href, false);
  });

  if (sessionStorage.getItem(STORAGE)) show(location.href, false);
  else showForm("");
})();
