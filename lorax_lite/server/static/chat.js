// One assistant's chat page: keeps the conversation, streams each answer from the OpenAI-compatible
// endpoint (/v1/chat/completions, stream: true) and shows failures plainly. Loaded by the page, or run by
// auth.js after it put the page in place (so it may run more than once in one document: all in a function).
// On a server with API keys it sends the key auth.js stored; a 401 drops it and reloads (the key form).
"use strict";

(() => {
  const root = document.getElementById("chat");
  if (!root) return;
  const config = JSON.parse(root.dataset.config);
  const list = document.getElementById("messages");
  const form = document.getElementById("ask");
  const question = document.getElementById("question");
  const send = document.getElementById("send");
  const errorBox = document.getElementById("error");
  const MAX_TOKENS = 256;
  const KEY_STORAGE = "lorax_api_key"; // as in auth.js

  let history = []; // [{role, content}] of finished turns; the server adds the adapter's system prompt

  document.getElementById("description").textContent = config.description || "";

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    item.textContent = text;
    list.appendChild(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      const error = body.error;
      return typeof error === "object" ? error.message : String(error || body.detail || response.statusText);
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  // Yields the JSON payload of each server-sent event until "data: [DONE]".
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function requestHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = { "Content-Type": "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function ask(text) {
    errorBox.hidden = true;
    const turn = { role: "user", content: text };
    addMessage("user", text);
    const answer = addMessage("assistant", "");
    answer.classList.add("streaming");
    send.disabled = true;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: requestHeaders(),
        body: JSON.stringify({ model: config.model, messages: [...history, turn], stream: true, max_tokens: MAX_TOKENS, temperature: 0 }),
      });
      if (response.status === 401) {
        sessionStorage.removeItem(KEY_STORAGE); // revoked or expired: the reloaded page asks for a key
        location.reload();
        return;
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) answer.textContent += delta.content;
      }
      history.push(turn, { role: "assistant", content: answer.textContent });
    } catch (err) {
      answer.remove(); // the failed turn is not kept in the conversation
      const reason = err instanceof TypeError ? "the server cannot be reached" : err.message;
      showError(`Could not get an answer: ${reason}`);
      question.value = text;
    } finally {
      answer.classList.remove("streaming");
      send.disabled = false;
      question.focus();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (!text || send.disabled) return;
    question.value = "";
    ask(text);
  });

  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  document.getElementById("reset").addEventListener("click", () => {
    history = [];
    list.replaceChildren();
    errorBox.hidden = true;
    question.focus();
  });
})();
