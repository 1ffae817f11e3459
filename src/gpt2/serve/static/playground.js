// The playground: send the prompt to /v1/completions with stream=true, read the server-sent
// events as they arrive, and show each generated token coloured by its probability, with the
// model's top alternatives on hover. Plain JavaScript: no build step, no dependency.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBER_FIELDS = ["max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs"];
let controller = null; // aborts the running request (the server then stops generating)

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function requestBody() {
  const body = { prompt: $("prompt").value, stream: true, echo: false };
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

function addToken(output, text, logprob, top) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.style.background = colour(Math.exp(logprob));
  span.dataset.token = text;
  span.dataset.logprob = String(logprob);
  span.dataset.top = JSON.stringify(top || {});
  output.appendChild(span);
}

function addText(output, text, className) {
  const span = document.createElement("span");
  if (className) span.className = className;
  span.textContent = text;
  output.appendChild(span);
}

// One chunk of the stream: its text, and the tokens (with log probabilities) that make it up.
function render(output, choice) {
  const lp = choice.logprobs;
  if (!lp || !lp.tokens || lp.tokens.length === 0) {
    if (choice.text) addText(output, choice.text);
    return 0;
  }
  // Token texts may not add up to the chunk's text (a character split across tokens):
  // trust the text, colour by token where they agree.
  const joined = lp.tokens.join("");
  if (joined !== choice.text) {
    addText(output, choice.text);
    return lp.tokens.length;
  }
  lp.tokens.forEach((tok, i) => addToken(output, tok, lp.token_logprobs[i], lp.top_logprobs && lp.top_logprobs[i]));
  return lp.tokens.length;
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

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
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

async function generate() {
  const output = $("output");
  output.replaceChildren();
  $("error").hidden = true;
  $("stats").textContent = "";
  const body = requestBody();
  addText(output, body.prompt, "prompt");
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let tokens = 0;
  let finish = null;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      showError((err.error && err.error.message) || `HTTP ${response.status}`);
      return;
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        tokens += render(output, choice);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      const seconds = (performance.now() - started) / 1000;
      $("stats").textContent = `${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s`;
    });
    if (finish) $("stats").textContent += ` · finished: ${finish}`;
  } catch (e) {
    if (e.name === "AbortError") $("stats").textContent += " · stopped";
    else showError(e.message);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
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
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
  });
  const output = $("output");
  output.addEventListener("mouseover", (e) => {
    if (e.target.classList.contains("tok")) showTooltip(e.target, e.clientX, e.clientY);
  });
  output.addEventListener("mouseout", (e) => {
    if (e.target.classList.contains("tok")) $("tooltip").hidden = true;
  });
  showModel();
}

document.addEventListener("DOMContentLoaded", init);
