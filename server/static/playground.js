// gam-serve playground: streams POST /generate_stream (TGI), shows every token's probability and its top
// alternatives, and live request statistics. No dependencies, no build step; the server validates every value.
"use strict";

const $ = (id) => document.getElementById(id);
const ROOT = new URL(".", document.baseURI); // the server root this page was served from (works behind a prefix)
const FINISH = { length: "length limit", eos_token: "end of sequence", stop_sequence: "stop string" };

let info = null; // GET /info
let apiKey = null; // kept in this page's memory only
let keyPrompt = null; // the open key dialog, shared by concurrent 401 answers
let controller = null; // AbortController of the running generation
let tokens = []; // [{token, top}] of the output shown
let selected = -1;
let pending = []; // token spans not yet in the page: the DOM is updated once per frame, however fast tokens come
let frame = 0;
let renderRun = null; // the run whose statistics the next frame shows

// ---- HTTP ----------------------------------------------------------------------------------------------------

/** The error message of a non-2xx answer, in TGI's or OpenAI's shape (else the raw text). */
async function errorMessage(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.error === "string") return body.error;
    if (body.error && typeof body.error.message === "string") return body.error.message;
  } catch {
    // not JSON: show the text as it came
  }
  return text || `${res.status} ${res.statusText}`;
}

/** Open the API-key dialog (once for concurrent callers); resolves with the key, rejects on cancel. */
function askKey(message) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve, reject) => {
      const dialog = $("key-dialog");
      $("key-message").textContent = message;
      $("api-key").value = "";
      dialog.returnValue = "";
      dialog.addEventListener(
        "close",
        () => {
          keyPrompt = null;
          const key = $("api-key").value.trim();
          if (dialog.returnValue === "ok" && key) resolve(key);
          else reject(new Error("This server needs an API key."));
        },
        { once: true },
      );
      dialog.showModal();
    });
  }
  return keyPrompt;
}

/** fetch() relative to the server root with the bearer key; a 401 asks for the key and retries. */
async function request(path, init = {}) {
  for (let asked = false; ; asked = true) {
    const headers = new Headers(init.headers);
    if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
    const res = await fetch(new URL(path, ROOT), { ...init, headers });
    if (res.status !== 401) {
      if (asked && info === null && path !== "info") loadInfo(); // the key was refused at load time, not now
      return res;
    }
    const why = await errorMessage(res);
    apiKey = await askKey(apiKey ? `The key was not accepted: ${why}` : `This server needs an API key: ${why}`);
  }
}

/** Server-Sent Events of a streamed answer: {data (parsed JSON), raw (the JSON text)} per event. */
async function* sseEvents(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const raw = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (raw) yield { data: JSON.parse(raw), raw };
    }
  }
}

// ---- the request -----------------------------------------------------------------------------------------------

/** A number field: null when empty, the text itself when it is no finite number (the server says what is wrong). */
function field(id) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const n = Number(text);
  return Number.isFinite(n) ? n : text;
}

/** The TGI body for the form: only what differs from the server's defaults, so `copy as curl` stays short. */
function requestBody() {
  const p = { details: true };
  const temperature = field("temperature");
  if (temperature === 0) {
    p.do_sample = false; // greedy: top-p, top-k and typical-p do not apply (TGI would sample if one were set)
  } else {
    p.do_sample = true;
    if (temperature !== null) p.temperature = temperature;
    const topP = field("top_p");
    const topK = field("top_k");
    const typicalP = field("typical_p");
    if (topP !== null && topP !== 1) p.top_p = topP;
    if (topK !== null && topK !== 0) p.top_k = topK;
    if (typicalP !== null && typicalP !== 1) p.typical_p = typicalP;
  }
  const repetition = field("repetition_penalty");
  if (repetition !== null && repetition !== 1) p.repetition_penalty = repetition;
  const maxNew = field("max_new_tokens");
  if (maxNew !== null) p.max_new_tokens = maxNew;
  const seed = $("seed").value.trim();
  if (seed !== "") {
    // seeds go up to 2**63 - 1: past 2**53 a JS number would round, so the digits are sent as they are
    p.seed = /^\d+$/.test(seed) && JSON.rawJSON ? JSON.rawJSON(seed) : field("seed");
  }
  const topN = field("top_n_tokens");
  if (topN !== null && topN !== 0) p.top_n_tokens = topN;
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  if (stop.length) p.stop = stop;
  return { inputs: $("prompt").value, parameters: p };
}

function curlCommand(body) {
  const quote = (s) => `'${s.replaceAll("'", "'\\''")}'`;
  const parts = ["curl", "-sN", quote(new URL("generate_stream", ROOT).href)];
  parts.push("-H", quote("Content-Type: application/json"));
  if (apiKey) parts.push("-H", '"Authorization: Bearer $GAM_API_KEY"');
  parts.push("-d", quote(JSON.stringify(body)));
  return parts.join(" ");
}

async function copyCurl() {
  const command = curlCommand(requestBody());
  const pre = $("curl");
  pre.textContent = command;
  pre.hidden = false;
  const note = apiKey ? " Set GAM_API_KEY to the key first." : "";
  try {
    await navigator.clipboard.writeText(command);
    $("copy-status").textContent = `Copied to the clipboard.${note}`;
  } catch {
    // no clipboard without a secure context or focus: the command is shown to copy by hand
    $("copy-status").textContent = `Copy the command below.${note}`;
  }
}

// ---- output ------------------------------------------------------------------------------------------------------

function percent(p) {
  const x = 100 * p;
  return `${x >= 0.1 ? x.toFixed(1) : x.toPrecision(2)} %`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop-button").disabled = !running;
  $("output").setAttribute("aria-busy", String(running));
}

function resetOutput() {
  tokens = [];
  selected = -1;
  pending = [];
  renderRun = null;
  $("output").replaceChildren();
  $("token-info").replaceChildren();
  $("error").hidden = true;
  $("error").textContent = "";
  for (const id of ["stat-ttft", "stat-tps", "stat-finish", "stat-seed", "stat-length", "stat-kv", "stat-ratio"]) {
    $(id).textContent = "–";
  }
  $("stat-tokens").textContent = "0";
}

function addToken(event, run) {
  const now = performance.now();
  if (run.first === null) run.first = now;
  run.last = now;
  run.n += 1;
  const { token } = event;
  const i = tokens.length;
  tokens.push({ token, top: event.top_tokens || [] });
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.index = String(i);
  span.dataset.id = String(token.id);
  if (token.logprob === null) {
    span.classList.add("unknown");
    span.title = "probability unknown";
  } else {
    const p = Math.exp(token.logprob);
    span.dataset.logprob = String(token.logprob);
    span.style.setProperty("--p", String(p));
    span.title = percent(p);
  }
  if (token.special) {
    span.classList.add("special"); // shown by CSS, so the output's text is the generated text exactly
    span.dataset.label = token.text;
  } else {
    span.textContent = token.text;
  }
  pending.push(span);
  renderRun = run;
  if (!frame) frame = requestAnimationFrame(render);
}

/** Put the pending tokens and the statistics on the page (one layout per frame, not one per token). */
function render() {
  if (frame) cancelAnimationFrame(frame);
  frame = 0;
  if (pending.length) {
    const out = $("output");
    const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 8;
    out.append(...pending);
    pending = [];
    if (atBottom) out.scrollTop = out.scrollHeight;
  }
  if (renderRun) updateStats(renderRun);
}

function updateStats(run) {
  $("stat-tokens").textContent = String(run.n);
  if (run.first !== null) $("stat-ttft").textContent = `${Math.round(run.first - run.t0)} ms`;
  if (run.n >= 2 && run.last > run.first) {
    $("stat-tps").textContent = ((run.n - 1) / ((run.last - run.first) / 1000)).toFixed(1);
  }
  if (run.promptTokens === null) return;
  const length = run.promptTokens + run.n;
  $("stat-length").textContent = `${length} tokens`;
  if (!info) return;
  const kv = 2 * info.n_layer * info.n_embd * info.dtype_bytes * length;
  $("stat-kv").textContent = bytes(kv);
  $("stat-kv").title = `${kv.toLocaleString()} bytes`;
  $("stat-ratio").textContent = `${(kv / info.state_bytes_per_sequence).toFixed(1)}×`;
}

function finish(details, raw, run) {
  run.finish = details.finish_reason;
  run.promptTokens = details.input_length;
  render();
  $("stat-finish").textContent = FINISH[details.finish_reason] || details.finish_reason;
  // the seed as the server wrote it: a random one is up to 2**63 - 1, which a JS number would round
  const seed = /"seed":\s*(\d+)/.exec(raw);
  $("stat-seed").textContent = seed ? seed[1] : "–";
  setStatus(`Done: ${FINISH[details.finish_reason] || details.finish_reason} after ${details.generated_tokens} tokens.`);
}

async function countPromptTokens(inputs, run) {
  try {
    const res = await request("tokenize", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ inputs }),
    });
    if (res.ok && run.promptTokens === null) {
      run.promptTokens = (await res.json()).length;
      if (run.n) render();
    }
  } catch {
    // the generation reports the same count (input_length) when it finishes
  }
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  const body = requestBody();
  resetOutput();
  controller = new AbortController();
  setRunning(true);
  setStatus("Generating…");
  const section = $("output-section"); // one column (a phone): bring the output into view
  if (section.getBoundingClientRect().top > window.innerHeight) section.scrollIntoView({ block: "start" });
  const run = { t0: performance.now(), first: null, last: null, n: 0, promptTokens: null, finish: null };
  countPromptTokens(body.inputs, run);
  try {
    const res = await request("generate_stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!res.ok) {
      showError(await errorMessage(res));
      setStatus(`The server refused the request (${res.status}).`);
      return;
    }
    for await (const { data, raw } of sseEvents(res)) {
      if (!("token" in data)) {
        showError(data.error ?? raw); // TGI's in-stream error event {error, error_type}
        setStatus(`The generation failed after ${run.n} tokens.`);
        return;
      }
      addToken(data, run);
      if (data.details) finish(data.details, raw, run);
    }
    if (run.finish === null) setStatus(`The stream ended early, after ${run.n} tokens.`);
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus(`Stopped after ${run.n} tokens.`);
    } else {
      showError(e.message);
      setStatus("The request failed.");
    }
  } finally {
    render(); // whatever arrived is shown before the page says the generation has ended
    controller = null;
    setRunning(false);
  }
}

function stop() {
  if (controller) controller.abort(); // the server sees the disconnect and frees the sequence's slot
}

// ---- token inspection ----------------------------------------------------------------------------------------

function cell(tag, text, className) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (className) el.className = className;
  return el;
}

function select(i) {
  if (i < 0 || i >= tokens.length) return;
  const out = $("output");
  out.querySelector(".tok.selected")?.classList.remove("selected");
  const span = out.querySelector(`.tok[data-index="${i}"]`);
  span.classList.add("selected");
  span.scrollIntoView({ block: "nearest" });
  selected = i;
  const { token, top } = tokens[i];
  const panel = $("token-info");
  const head = document.createElement("p");
  head.append(cell("strong", `Token ${i + 1}: `), cell("code", JSON.stringify(token.text)), ` (id ${token.id}) · `);
  if (token.logprob === null) {
    head.append("probability unknown");
  } else {
    const prob = cell("span", percent(Math.exp(token.logprob)));
    prob.id = "token-prob";
    head.append("probability ", prob, ` · logprob ${token.logprob.toFixed(4)}`);
  }
  panel.replaceChildren(head);
  if (!top.length) return;
  const table = document.createElement("table");
  table.append(cell("caption", `Top ${top.length} alternatives`));
  const headRow = document.createElement("tr");
  headRow.append(cell("th", "Token"), cell("th", "id", "num"), cell("th", "Probability", "num"), cell("th", "logprob", "num"));
  for (const th of headRow.children) th.scope = "col";
  table.createTHead().append(headRow);
  const tbody = table.createTBody();
  for (const alt of top) {
    const row = tbody.insertRow();
    row.dataset.id = String(alt.id);
    if (alt.id === token.id) row.className = "chosen";
    const p = alt.logprob === null ? null : Math.exp(alt.logprob);
    row.append(
      cell("td", JSON.stringify(alt.text)),
      cell("td", String(alt.id), "num"),
      cell("td", p === null ? "–" : percent(p), "num prob"),
      cell("td", alt.logprob === null ? "–" : alt.logprob.toFixed(4), "num"),
    );
  }
  panel.append(table);
}

function onOutputKey(e) {
  const moves = { ArrowRight: selected + 1, ArrowDown: selected + 1, ArrowLeft: selected - 1, ArrowUp: selected - 1 };
  moves.Home = 0;
  moves.End = tokens.length - 1;
  if (!(e.key in moves) || !tokens.length) return;
  e.preventDefault();
  select(Math.min(Math.max(moves[e.key], 0), tokens.length - 1));
}

// ---- start -----------------------------------------------------------------------------------------------------

async function loadInfo() {
  try {
    const res = await request("info");
    if (!res.ok) throw new Error(await errorMessage(res));
    info = await res.json();
  } catch (e) {
    $("model-info").textContent = `Model information unavailable: ${e.message}`;
    return;
  }
  const dtype = info.model_dtype.replace("torch.", "");
  $("model-info").textContent = [
    info.model_id,
    `${dtype} on ${info.model_device_type}`,
    `${info.n_layer} layers × ${info.n_embd}`,
    `context window ${info.block_size}`,
    `vocabulary ${info.vocab_size}`,
    `up to ${info.max_new_tokens} new tokens`,
    `gam-serve ${info.version}`,
  ].join(" · ");
  const maxNew = $("max_new_tokens");
  maxNew.max = String(info.max_new_tokens);
  if (Number(maxNew.value) > info.max_new_tokens) maxNew.value = String(info.max_new_tokens);
  const topN = $("top_n_tokens");
  topN.max = String(info.max_top_n_tokens);
  if (Number(topN.value) > info.max_top_n_tokens) topN.value = String(info.max_top_n_tokens);
  const perToken = 2 * info.n_layer * info.n_embd * info.dtype_bytes;
  $("stat-state").textContent = bytes(info.state_bytes_per_sequence);
  $("stat-state").title = `${info.state_bytes_per_sequence.toLocaleString()} bytes`;
  $("memory-help").textContent =
    `GAM decodes from a fixed state per sequence (each layer's last convolution inputs and the last ` +
    `${info.receptive_field} token ids): it never grows. A Transformer of the same depth and width caches a key ` +
    `and a value per layer for every token: 2 × ${info.n_layer} × ${info.n_embd} × ${info.dtype_bytes} B = ` +
    `${bytes(perToken)} per token.`;
}

function main() {
  $("request-form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", stop);
  $("copy-curl").addEventListener("click", copyCurl);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("request-form").requestSubmit();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && controller && !$("key-dialog").open) stop();
  });
  const out = $("output");
  out.addEventListener("click", (e) => {
    const span = e.target.closest(".tok");
    if (span) select(Number(span.dataset.index));
  });
  out.addEventListener("keydown", onOutputKey);
  out.addEventListener("focus", () => {
    if (selected < 0 && tokens.length) select(0);
  });
  loadInfo();
}

main();
