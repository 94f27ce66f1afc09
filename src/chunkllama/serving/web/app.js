// chunkllama web page: upload or paste a document, ask questions, stream answers.
// Plain browser JS (no build step, no CDN). Talks to the same server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, maxContext: null, window: null, history: [], busy: false, countTimer: null };

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function loadModel() {
  try {
    const models = await (await api("/v1/models", { headers: headers(false) })).json();
    const card = models.data[0];
    state.model = card.id;
    state.maxContext = card.max_context;
    $("model").textContent = card.id + " · max context " + card.max_context + " tokens";
  } catch (e) {
    $("model").textContent = "cannot list models: " + e.message;
  }
}

function showDocumentStats(info) {
  state.window = info.pretraining_length || state.window;
  state.maxContext = info.max_context || state.maxContext;
  const ratio = state.window ? (info.tokens / state.window).toFixed(2) + "× the model's window" : "";
  $("doc-stats").textContent = info.tokens + " tokens (" + ratio + " of " + state.window +
    "; server limit " + state.maxContext + ")" + (info.filename ? " · " + info.filename : "");
  const fill = $("meter-fill");
  fill.style.width = Math.min(100, 100 * info.tokens / state.maxContext) + "%";
  fill.classList.toggle("over", info.tokens >= state.maxContext);
  $("meter-window").style.left = Math.min(100, 100 * state.window / state.maxContext) + "%";
}

async function uploadFile(file) {
  $("doc-stats").textContent = "reading " + file.name + "…";
  try {
    const response = await api("/v1/documents?filename=" + encodeURIComponent(file.name),
      { method: "POST", headers: headers(false), body: file });
    const info = await response.json();
    $("document").value = info.text;
    showDocumentStats(info);
    resetChat();
  } catch (e) {
    $("doc-stats").textContent = "could not read " + file.name + ": " + e.message;
  }
}

async function countPasted() {
  const text = $("document").value;
  if (!text) { $("doc-stats").textContent = "no document"; return; }
  try {
    const response = await api("/v1/documents?filename=pasted.txt",
      { method: "POST", headers: headers(false), body: new Blob([text], { type: "text/plain" }) });
    showDocumentStats(await response.json());
  } catch (e) {
    $("doc-stats").textContent = e.message;
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function resetChat() {
  state.history = [];
  $("messages").innerHTML = "";
}

function buildMessages(question) {
  const doc = $("document").value.trim();
  const first = doc
    ? "Read the document and answer the question.\n\nDocument:\n" + doc + "\n\nQuestion: " + (state.history.length ? state.history[0].question : question)
    : (state.history.length ? state.history[0].question : question);
  const messages = [{ role: "user", content: first }];
  state.history.forEach((turn, i) => {
    messages.push({ role: "assistant", content: turn.answer });
    if (i + 1 < state.history.length) messages.push({ role: "user", content: state.history[i + 1].question });
  });
  if (state.history.length) messages.push({ role: "user", content: question });
  return messages;
}

async function ask(question) {
  if (state.busy || !question) return;
  state.busy = true;
  $("send").disabled = true;
  addMessage("user", question);
  const answerDiv = addMessage("assistant", "");
  answerDiv.classList.add("streaming");
  const prefix = $("answer-prefix").value.trim();
  const messages = buildMessages(question);
  if (prefix) messages.push({ role: "assistant", content: prefix });
  const body = {
    model: state.model, messages: messages, stream: true, continue_final_message: Boolean(prefix),
    stream_options: { include_usage: true }, chunkllama_progress: true,
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const started = performance.now();
  let firstToken = null, answer = prefix, usage = null;
  answerDiv.textContent = answer;
  $("progress").hidden = false;
  $("progress-bar").value = 0;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.progress) {
          $("progress-bar").value = chunk.progress.done / chunk.progress.total;
          $("progress-label").textContent = "reading the document… " + chunk.progress.done + " / " + chunk.progress.total + " tokens";
        }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (firstToken === null) { firstToken = performance.now(); $("progress").hidden = true; }
            answer += text;
            answerDiv.textContent = answer;
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
    state.history.push({ question, answer });
    const stats = document.createElement("span");
    stats.className = "stats";
    const ttft = firstToken === null ? "–" : ((firstToken - started) / 1000).toFixed(2) + " s";
    stats.textContent = "first token " + ttft + (usage ? " · " + usage.prompt_tokens + " prompt tokens (" +
      ((usage.prompt_tokens_details || {}).cached_tokens || 0) + " cached) · " + usage.completion_tokens + " answer tokens" : "");
    answerDiv.appendChild(stats);
  } catch (e) {
    answerDiv.remove();
    addMessage("error", e.message);
  } finally {
    answerDiv.classList.remove("streaming");
    answerDiv.classList.add("done");
    $("progress").hidden = true;
    state.busy = false;
    $("send").disabled = false;
  }
}

$("file").addEventListener("change", (event) => { if (event.target.files[0]) uploadFile(event.target.files[0]); });
$("document").addEventListener("input", () => {
  clearTimeout(state.countTimer);
  state.countTimer = setTimeout(countPasted, 400);
  resetChat();
});
$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  $("question").value = "";
  ask(question);
});
$("reset").addEventListener("click", resetChat);
loadModel();
