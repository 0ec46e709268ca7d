// r1lab chat page: sends the conversation to /v1/chat/completions with stream: true and renders the SSE deltas,
// reasoning_content into a collapsible block and content as the answer. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "top_p", "max_tokens", "seed", "system", "api_key"];
let history = [];  // {role, content} turns sent back to the model (answers only, never the reasoning)
let modelId = null;
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    modelId = body.data[0].id;
    $("model").textContent = modelId;
  } catch (err) {
    $("model").textContent = `not connected: ${err.message}`;
  }
}

function restoreSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem(`r1lab.${id}`);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => {
      localStorage.setItem(`r1lab.${id}`, $(id).value);
      if (id === "api_key") loadModel();
    });
  }
}

function element(tag, className, parent, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text) el.textContent = text;  // textContent, never innerHTML: model output is not trusted markup
  if (parent) parent.appendChild(el);
  return el;
}

function addMessage(role) {
  $("empty")?.remove();
  const root = element("div", `message ${role}`, $("conversation"));
  return root;
}

function addAssistant() {
  const root = addMessage("assistant");
  const details = element("details", "reasoning", root);
  details.open = true;
  details.hidden = true;  // shown once reasoning arrives
  const summary = element("summary", "", details, "Thinking…");
  const reasoning = element("div", "reasoning-text", details);
  const answer = element("div", "answer", root);
  const meta = element("div", "meta", root);
  root.dataset.chunks = "0";
  return { root, details, summary, reasoning, answer, meta, started: performance.now(), thoughtFor: null };
}

function scrollDown() {
  const c = $("conversation");
  c.scrollTop = c.scrollHeight;
}

// Parse a text/event-stream body: events end with a blank line, each "data:" line carries one JSON chunk.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function onChunk(view, chunk) {
  view.root.dataset.chunks = String(Number(view.root.dataset.chunks) + 1);
  if (chunk.error) throw new Error(chunk.error.message);
  if (chunk.usage) view.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const delta = choice.delta || {};
  if (delta.reasoning_content) {
    view.details.hidden = false;
    view.reasoning.textContent += delta.reasoning_content;
  }
  if (delta.content) {
    if (view.thoughtFor === null && !view.details.hidden) {
      view.thoughtFor = (performance.now() - view.started) / 1000;
      view.summary.textContent = `Reasoning (${view.thoughtFor.toFixed(1)} s)`;
    }
    view.answer.textContent += delta.content;
  }
  if (choice.finish_reason) view.finish = choice.finish_reason;
  scrollDown();
}

function requestBody(messages) {
  const body = {
    model: modelId, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function send(text) {
  if (!modelId) await loadModel();
  element("div", "", addMessage("user"), text);
  history.push({ role: "user", content: text });
  const view = addAssistant();
  scrollDown();
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    await readEvents(response.body, (chunk) => onChunk(view, chunk));
    history.push({ role: "assistant", content: view.answer.textContent });
    finishView(view);
  } catch (err) {
    history.pop();  // the question stays on screen but is not replayed without an answer
    const stopped = err.name === "AbortError";
    element("div", stopped ? "" : "error", view.meta, stopped ? "stopped" : `error: ${err.message}`);
  } finally {
    view.root.classList.add("done");
    if (view.thoughtFor === null && !view.details.hidden) view.summary.textContent = "Reasoning";
    setBusy(false);
    controller = null;
  }
}

function finishView(view) {
  const parts = [];
  if (view.usage) parts.push(`${view.usage.completion_tokens} tokens`);
  if (view.finish === "length") parts.push("cut at max tokens");
  parts.push(`${((performance.now() - view.started) / 1000).toFixed(1)} s`);
  view.meta.textContent = parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function main() {
  restoreSettings();
  loadModel();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    $("conversation").replaceChildren(element("p", "empty", null,
      "Ask something. The model's reasoning streams into a collapsible block, then its answer."));
    $("conversation").firstChild.id = "empty";
  });
}

main();
