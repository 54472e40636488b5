// flashserve's chat page: streams replies from /v1/chat/completions, with the API key when the server needs one.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "flashserve-api-key";
const state = { model: null, messages: [], controller: null, key: localStorage.getItem(KEY_STORAGE) || "" };

function headers() {
  const result = { "Content-Type": "application/json" };
  if (state.key) result.Authorization = "Bearer " + state.key;
  return result;
}

async function askForKey(message) {
  $("key-message").textContent = message;
  $("key").value = state.key;
  const dialog = $("key-dialog");
  const closed = new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  dialog.showModal();
  await closed;
  state.key = $("key").value.trim();
  localStorage.setItem(KEY_STORAGE, state.key);
}

// fetch() of an API route; a 401 asks for the key and tries again.
async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers() });
    if (response.status !== 401) return response;
    await askForKey(state.key ? "The server refused that API key; enter another." : "This server needs an API key.");
  }
}

async function loadModel() {
  const response = await api("v1/models");
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = state.model;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function samplingFields() {
  const fields = {};
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    const value = $(name).value.trim();
    if (value !== "") fields[name] = Number(value);
  }
  return fields;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.state = busy ? "streaming" : "idle";
}

// Server-sent events of a streamed chat completion: calls onChunk(parsed JSON) per event until [DONE].
async function readEvents(response, onChunk) {
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
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages] : state.messages;
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true },
                 ...samplingFields() };
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstToken = null;
  let tokens = 0;
  try {
    const response = await api("v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                        signal: state.controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error ? error.error.message : `HTTP ${response.status}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta.content : null;
      if (delta) {
        firstToken = firstToken ?? performance.now();
        reply.textContent += delta;
        reply.scrollIntoView({ block: "end" });
      }
    });
    const seconds = (performance.now() - started) / 1000;
    $("speed").textContent = `${tokens} tokens in ${seconds.toFixed(2)} s · ${(tokens / seconds).toFixed(1)} tok/s`
      + (firstToken ? ` · first token ${((firstToken - started) / 1000).toFixed(2)} s` : "");
  } catch (error) {
    if (error.name === "AbortError") {
      reply.classList.add("stopped");
    } else {
      reply.classList.add("error");
      reply.textContent += (reply.textContent ? "\n" : "") + "Error: " + error.message;
    }
  } finally {
    if (reply.classList.contains("error")) state.messages.pop();  // the failed turn leaves no trace in the history
    else state.messages.push({ role: "assistant", content: reply.textContent });
    state.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
});
setBusy(false);
loadModel().catch((error) => { $("model").textContent = "unavailable: " + error.message; });
