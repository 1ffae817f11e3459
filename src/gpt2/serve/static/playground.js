// The playground: two views over the same settings. Completion sends the prompt to
// /v1/completions; Chat sends the conversation (a system prompt, then the turns so far) to
// /v1/chat/completions. Both stream (stream=true): the server-sent events are read as they
// arrive and each generated token is shown coloured by its probability, with the model's top
// alternatives on hover. Plain JavaScript: no build step, no dependency.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBER_FIELDS = ["max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty"];

// Each view's controls; `controller` aborts its running request (the server then stops).
const views = {
  complete: { go: "generate", stop: "stop", stats: "stats", error: "error", controller: null },
  chat: { go: "send", stop: "chat_stop", stats: "chat_stats", error: "chat_error", controller: null },
};
let history = []; // the chat's turns so far: {role: "user" | "assistant", content}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// The settings panel as request fields, the same for both endpoints.
function settings() {
  const body = { stream: true };
  for (const name of NUMBER_FIELDS) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = Number(value);
  }
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const stops = $("stop_strings").value.split("\n").filter((s) => s !== "").map((s) => s.replaceAll("\\n", "\n"));
  if (stops.length) body.stop = stops.slice(0, 4);
  return body;
}

function alternatives() {
  const value = $("logprobs").value.trim();
  return value === "" ? 0 : Number(value);
}

// A probability in [0, 1] as a background: red (unlikely) through yellow to green (likely).
function colour(p) {
  return `hsl(${Math.round(120 * p)}, 65%, 85%)`;
}

function percent(logprob) {
  const p = Math.exp(logprob) * 100;
  return p >= 10 ? `${p.toFixed(0)}%` : p >= 0.1 ? `${p.toFixed(1)}%` : "<0.1%";
}

function visible(text) {
  return JSON.stringify(text).slice(1, -1); // shows spaces at the edges, \n and \t
}

function addToken(container, shown, token) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = shown;
  span.style.background = colour(Math.exp(token.logprob));
  span.dataset.token = token.text;
  span.dataset.logprob = String(token.logprob);
  span.dataset.top = JSON.stringify(token.top);
  container.appendChild(span);
}

function addText(container, text, className) {
  const span = document.createElement("span");
  if (className) span.className = className;
  span.textContent = text;
  container.appendChild(span);
}

// One chunk's text and the tokens ({text, logprob, top: {token: logprob}}) that make it up.
// Token texts may hold more than the text at its start (a chat reply loses the space the
// template writes after "Assistant:") or not add up to it at all (a character split across
// tokens): colour by token where they agree, else trust the text.
function renderPiece(container, text, tokens) {
  const joined = tokens.map((t) => t.text).join("");
  let cut = joined.length - text.length;
  if (tokens.length === 0 || cut < 0 || joined.slice(cut) !== text) {
    if (text) addText(container, text);
    return tokens.length;
  }
  for (const token of tokens) {
    const drop = Math.min(cut, token.text.length);
    cut -= drop;
    addToken(container, token.text.slice(drop), token);
  }
  return tokens.length;
}

// The tokens of a /v1/completions chunk, in renderPiece's form.
function completionTokens(lp) {
  if (!lp || !lp.tokens) return [];
  return lp.tokens.map((text, i) => ({
    text, logprob: lp.token_logprobs[i], top: (lp.top_logprobs && lp.top_logprobs[i]) || {},
  }));
}

// The tokens of a /v1/chat/completions chunk, in renderPiece's form (the chosen one among
// its alternatives, as the completions API lists it).
function chatTokens(lp) {
  if (!lp || !lp.content) return [];
  return lp.content.map((t) => {
    const top = Object.fromEntries(t.top_logprobs.map((alt) => [alt.token, alt.logprob]));
    if (!(t.token in top)) top[t.token] = t.logprob;
    return { text: t.token, logprob: t.logprob, top };
  });
}

function showTooltip(span, x, y) {
  const tip = $("tooltip");
  const top = Object.entries(JSON.parse(span.dataset.top)).sort((a, b) => b[1] - a[1]);
  const table = document.createElement("table");
  for (const [token, logprob] of top) {
    const row = table.insertRow();
    if (token === span.dataset.token) row.className = "chosen";
    row.insertCell().textContent = visible(token);
    const p = row.insertCell();
    p.className = "p";
    p.textContent = percent(logprob);
  }
  tip.replaceChildren(table);
  tip.hidden = false;
  tip.style.left = `${Math.min(x + 12, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${y + 16}px`;
}

// Read server-sent events from a fetch response; call onData with each parsed `data:` payload.
async function readEvents(response, onData) {
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
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

// Send `body` to `path` for `view` and stream the answer: onChoice(choice) renders a chunk's
// choice and returns how many tokens it held. Resolves to "finished", "stopped" or "failed".
async function streamInto(view, path, body, onChoice) {
  const v = views[view];
  $(v.error).hidden = true;
  $(v.stats).textContent = "";
  v.controller = new AbortController();
  $(v.go).disabled = true;
  $(v.stop).disabled = false;
  const started = performance.now();
  let tokens = 0;
  let finish = null;
  try {
    const response = await fetch(path, {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: v.controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${response.status}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        tokens += onChoice(choice);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      const seconds = (performance.now() - started) / 1000;
      $(v.stats).textContent = `${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s`;
    });
    if (finish) $(v.stats).textContent += ` · finished: ${finish}`;
    return "finished";
  } catch (e) {
    if (e.name === "AbortError") {
      $(v.stats).textContent += " · stopped";
      return "stopped";
    }
    $(v.error).textContent = e.message;
    $(v.error).hidden = false;
    return "failed";
  } finally {
    v.controller = null;
    $(v.go).disabled = false;
    $(v.stop).disabled = true;
  }
}

async function generate() {
  const output = $("output");
  output.replaceChildren();
  const body = { ...settings(), prompt: $("prompt").value, echo: false, logprobs: alternatives() };
  addText(output, body.prompt, "prompt");
  await streamInto("complete", "/v1/completions", body, (choice) =>
    renderPiece(output, choice.text, completionTokens(choice.logprobs)));
}

// A message in the chat log: its role's name, then its text (a container for a reply's tokens).
function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `msg ${role}`;
  addText(message, role === "user" ? "You" : "Model", "role");
  const content = document.createElement("div");
  content.className = "text";
  content.textContent = text;
  message.appendChild(content);
  $("chat_log").appendChild(message);
  message.scrollIntoView({ block: "end" });
  return content;
}

function conversation() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(history);
}

// Send the typed message with the turns before it; the reply streams into the log. A reply
// stopped halfway stays in the history as far as it went (as `gpt2 chat` keeps it); a refused
// request takes the message back to the input box.
async function send() {
  const text = $("chat_input").value;
  if (!text.trim() || views.chat.controller) return;
  const turn = { role: "user", content: text };
  const turns = history; // a reset while the reply streams starts another list
  turns.push(turn);
  $("chat_input").value = "";
  const asked = addMessage("user", text).parentElement;
  const replyBox = addMessage("assistant", "");
  let reply = "";
  const body = { ...settings(), messages: conversation(), logprobs: true, top_logprobs: alternatives() };
  const outcome = await streamInto("chat", "/v1/chat/completions", body, (choice) => {
    const piece = choice.delta.content || "";
    reply += piece;
    return renderPiece(replyBox, piece, chatTokens(choice.logprobs));
  });
  if (turns !== history) return;
  if (outcome === "failed") {
    turns.pop();
    asked.remove();
    replyBox.parentElement.remove();
    $("chat_input").value = text;
    return;
  }
  turns.push({ role: "assistant", content: reply });
}

function reset() {
  if (views.chat.controller) views.chat.controller.abort();
  history = [];
  $("chat_log").replaceChildren();
  $("chat_stats").textContent = "";
  $("chat_error").hidden = true;
  $("chat_input").focus();
}

function showView(name) {
  for (const view of ["complete", "chat"]) {
    $(`${view}_view`).hidden = view !== name;
    $(`tab_${view}`).setAttribute("aria-selected", String(view === name));
  }
  $(name === "chat" ? "chat_input" : "prompt").focus();
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: apiHeaders() });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error ? data.error.message : `HTTP ${response.status}`);
    const card = data.data[0];
    $("model").textContent = `${card.id} · context ${card.context_length} tokens`;
  } catch (e) {
    $("model").textContent = `model unknown (${e.message})`;
  }
}

function init() {
  const saved = sessionStorage.getItem("gpt2-api-key");
  if (saved) $("api_key").value = saved;
  $("api_key").addEventListener("change", () => {
    sessionStorage.setItem("gpt2-api-key", $("api_key").value);
    showModel();
  });
  $("tab_complete").addEventListener("click", () => showView("complete"));
  $("tab_chat").addEventListener("click", () => showView("chat"));
  $("generate").addEventListener("click", generate);
  $("send").addEventListener("click", send);
  $("reset").addEventListener("click", reset);
  for (const v of Object.values(views)) {
    $(v.stop).addEventListener("click", () => v.controller && v.controller.abort());
  }
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
  });
  $("chat_input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault(); // Shift+Enter writes a new line
      send();
    }
  });
  for (const container of [$("output"), $("chat_log")]) {
    container.addEventListener("mouseover", (e) => {
      if (e.target.classList.contains("tok")) showTooltip(e.target, e.clientX, e.clientY);
    });
    container.addEventListener("mouseout", (e) => {
      if (e.target.classList.contains("tok")) $("tooltip").hidden = true;
    });
  }
  if (location.hash === "#chat") showView("chat");
  showModel();
}

document.addEventListener("DOMContentLoaded", init);
