// The chat page: plain JavaScript over the server's own OpenAI-compatible API (no build step, no CDN).
"use strict";

// Images are scaled down in the browser before upload (the model reads 224-560 px): to at most the
// first side that fits the server's byte limit; the original is kept for display.
const SIDES = [1024, 768, 512];
const $ = (id) => document.getElementById(id);
const server = { model: null, mediaToken: "<image>", endOfChunk: "<|endofchunk|>", maxImages: 16,
                 maxImageBytes: 8 << 20 };
let history = [];       // OpenAI chat messages of this conversation
let attachments = [];   // images waiting for the next message: { display: blob URL, url: data URL sent }
let running = null;     // AbortController of the request in flight

// ------------------------------------------------------------------------------------- API
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Sizes as people read them: 9485229 -> "9.0 MB", 8388608 -> "8 MB" (rounded), 20000 -> "20 KB".
function megabytes(bytes, exact) {
  if (bytes < (1 << 20)) return Math.round(bytes / 1024) + " KB";
  const mb = (bytes / (1 << 20)).toFixed(1);
  return (exact ? mb : String(Number(mb))) + " MB";
}

// The server's refusal in a person's words where the page knows better ones than the API's.
const HUMAN_ERRORS = {
  image_too_large: () => "This image is too large for the server (it takes up to " +
    megabytes(server.maxImageBytes) + " and a limited number of pixels); try a smaller one.",
  invalid_image: () => "The server could not read this image; try a PNG or JPEG file.",
  too_many_images: () => "Too many images for one message (the server takes up to " + server.maxImages + ").",
  context_length_exceeded: () => "The conversation is too long for the model; start a new chat.",
  queue_full: () => "The server is busy; try again in a moment.",
  shutting_down: () => "The server is shutting down.",
};

function humanError(error) {
  const words = error && HUMAN_ERRORS[error.code];
  return words ? words() : (error && error.message) || "the server refused the request";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? humanError(body.error) : "HTTP " + response.status;
  } catch (e) {
    return "HTTP " + response.status;
  }
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

// Reads an SSE response (data: lines), calling onChunk with each parsed chunk until [DONE].
async function readStream(response, onChunk) {
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
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(humanError(chunk.error));
        onChunk(chunk);
      }
    }
  }
}

function settings() {
  return { max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 32),
           temperature: Math.max(0, parseFloat($("temperature").value) || 0) };
}

function setStatus(text) { $("status").textContent = text || ""; }

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const card = (await response.json()).data[0];
    server.model = card.id;
    server.mediaToken = card.media_token || server.mediaToken;
    server.endOfChunk = card.end_of_chunk_token || server.endOfChunk;
    server.maxImages = card.max_images || server.maxImages;
    server.maxImageBytes = card.max_image_bytes || server.maxImageBytes;
    $("model-name").textContent = card.id;
    setStatus("");
  } catch (e) {
    $("model-name").textContent = "not connected";
    setStatus(String(e.message || e));
  }
}

// ---------------------------------------------------------------------------------- images
// Bytes of the data URL's payload (what the server counts).
function payloadBytes(dataURL) {
  const payload = dataURL.slice(dataURL.indexOf(",") + 1);
  return Math.floor(payload.length * 3 / 4) - (payload.endsWith("==") ? 2 : payload.endsWith("=") ? 1 : 0);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The image to show (the original, as a blob URL) and the one to send: a data URL at most SIDES[0]
// px on its longer side, smaller still if it must be to fit the server's byte limit. Throws a
// person's message if no size fits.
async function prepareImage(file) {
  const display = URL.createObjectURL(file);
  const image = new Image();
  image.src = display;
  await image.decode();
  const longer = Math.max(image.naturalWidth, image.naturalHeight);
  if (longer <= SIDES[0] && file.size <= server.maxImageBytes) return { display, url: await readFile(file) };
  for (const side of SIDES) {
    const scale = Math.min(1, side / longer);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
    // PNG keeps drawings and transparency exact; JPEG is far smaller for photos.
    for (const url of [file.type === "image/png" ? canvas.toDataURL("image/png") : null,
                       canvas.toDataURL("image/jpeg", 0.9)]) {
      if (url && payloadBytes(url) <= server.maxImageBytes) return { display, url };
    }
  }
  URL.revokeObjectURL(display);
  throw new Error("This image is " + megabytes(file.size, true) + "; the server takes up to " +
                  megabytes(server.maxImageBytes) + ", and it is still larger scaled down.");
}

function imageProblem(file, error) {
  const message = String((error && error.message) || error);
  return message.startsWith("This image") ? message : "Could not read " + file.name + " as an image.";
}

function thumbnail(url, onRemove) {
  const box = document.createElement("span");
  box.className = "thumb";
  const img = document.createElement("img");
  img.src = url;
  img.alt = "image";
  box.appendChild(img);
  if (onRemove) {
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "x";
    remove.title = "remove";
    remove.onclick = onRemove;
    box.appendChild(remove);
  }
  return box;
}

async function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    try {
      attachments.push(await prepareImage(file));
    } catch (e) {
      setStatus(imageProblem(file, e));
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren(...attachments.map((image, i) =>
    thumbnail(image.display, () => { attachments.splice(i, 1); renderAttachments(); })));
}

// ------------------------------------------------------------------------------------ chat
function addMessage(role, text, images) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Flamingo" : "Error";
  div.appendChild(who);
  if (images && images.length) {
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    images.forEach((url) => thumbs.appendChild(thumbnail(url)));
    div.appendChild(thumbs);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function busy(controller) {
  running = controller;
  $("send").disabled = !!controller;
  $("fs-generate").disabled = !!controller;
  $("fs-rank").disabled = !!controller;
  $("stop").hidden = !controller;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if ((!text && !attachments.length) || running) return;
  const content = attachments.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (text) content.push({ type: "text", text });
  addMessage("user", text, attachments.map((image) => image.display));
  const message = { role: "user", content };
  $("prompt").value = "";
  attachments = [];
  renderAttachments();
  setStatus("");
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  const controller = new AbortController();
  busy(controller);
  try {
    const response = await post("/v1/chat/completions",
      { model: server.model, messages: history.concat([message]), stream: true, ...settings() }, controller.signal);
    await readStream(response, (chunk) => {
      // the model's reply starts after "Flamingo:", usually with a space: not shown
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) out.textContent = (out.textContent + choice.delta.content).trimStart();
      }
    });
    history.push(message, { role: "assistant", content: out.textContent });
    if (!out.textContent) {  // the model ended its answer at once: say so rather than show nothing
      reply.classList.add("empty");
      out.textContent = "(empty answer: the model said nothing)";
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      reply.className = "message error";
      out.textContent = String(e.message || e);
    } else {
      history.push(message, { role: "assistant", content: out.textContent });
    }
  } finally {
    reply.dataset.done = "true";
    busy(null);
  }
}

function resetChat() {
  if (running) running.abort();
  history = [];
  attachments = [];
  renderAttachments();
  $("messages").replaceChildren();
  setStatus("");
}

// -------------------------------------------------------------------------------- few-shot
function exampleRow(text) {
  const row = document.createElement("div");
  row.className = "example";
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  const label = document.createElement("label");
  label.className = "file";
  label.textContent = "Image ";
  const input = document.createElement("input");
  input.type = "file";
  input.accept = "image/*";
  input.className = "example-image";
  label.appendChild(input);
  const answer = document.createElement("input");
  answer.type = "text";
  answer.className = "example-text";
  answer.placeholder = "its text, e.g. This is a dax.";
  answer.value = text || "";
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary";
  remove.textContent = "Remove";
  remove.onclick = () => row.remove();
  input.onchange = async () => {
    const image = await chooseImage(input.files[0]);
    row.dataset.image = image ? image.url : "";
    thumbs.replaceChildren(...(image ? [thumbnail(image.display)] : []));
  };
  row.append(thumbs, label, answer, remove);
  $("examples").appendChild(row);
}

// A few-shot image (or null, with the reason in the status line).
async function chooseImage(file) {
  if (!file) return null;
  try {
    return await prepareImage(file);
  } catch (e) {
    setStatus(imageProblem(file, e));
    return null;
  }
}

// The interleaved prompt: <image>text<|endofchunk|> per example, then <image>query.
function fewShotRequest() {
  const images = [];
  let prompt = "";
  for (const row of document.querySelectorAll("#examples .example")) {
    const text = row.querySelector(".example-text").value;
    if (!row.dataset.image && !text.trim()) continue;
    if (!row.dataset.image) throw new Error("an example has no image");
    images.push(row.dataset.image);
    prompt += "<image>" + text + server.endOfChunk;
  }
  const query = $("query-thumb").dataset.image;
  if (!query) throw new Error("choose a query image");
  images.push(query);
  prompt += "<image>" + $("query-text").value;
  $("fs-prompt").textContent = prompt;
  return { model: server.model, prompt, images };
}

async function fewShotGenerate() {
  const out = $("fs-output");
  setStatus("");
  const controller = new AbortController();
  try {
    const request = fewShotRequest();
    out.textContent = $("query-text").value;
    busy(controller);
    const response = await post("/v1/completions", { ...request, stream: true, ...settings() }, controller.signal);
    await readStream(response, (chunk) => { for (const choice of chunk.choices) out.textContent += choice.text; });
  } catch (e) {
    if (e.name !== "AbortError") setStatus(String(e.message || e));
  } finally {
    out.dataset.done = "true";
    busy(null);
  }
}

async function fewShotRank() {
  const out = $("fs-output");
  setStatus("");
  const candidates = $("candidates").value.split(/[,\n]/).map((c) => c.trim()).filter(Boolean);
  const controller = new AbortController();
  try {
    if (!candidates.length) throw new Error("type candidates separated by commas");
    const request = fewShotRequest();
    busy(controller);
    // Each candidate continues the query text after a space, as a word would.
    const response = await post("/v1/rank", { ...request, candidates: candidates.map((c) => " " + c) },
                                controller.signal);
    const table = document.createElement("table");
    for (const result of (await response.json()).results) {
      const row = table.insertRow();
      row.insertCell().textContent = result.candidate.trim();
      row.insertCell().textContent = "log p = " + result.logprob.toFixed(3);
    }
    out.replaceChildren(table);
  } catch (e) {
    if (e.name !== "AbortError") setStatus(String(e.message || e));
  } finally {
    out.dataset.done = "true";
    busy(null);
  }
}

// ------------------------------------------------------------------------------------ wiring
function showTab(name) {
  for (const tab of ["chat", "fewshot"]) {
    $("tab-" + tab).classList.toggle("active", tab === name);
    $(tab + "-panel").hidden = tab !== name;
  }
}

$("tab-chat").onclick = () => showTab("chat");
$("tab-fewshot").onclick = () => showTab("fewshot");
$("composer").addEventListener("submit", sendChat);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("image-input").onchange = async () => { await attach($("image-input").files); $("image-input").value = ""; };
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length && !$("chat-panel").hidden) { e.preventDefault(); attach(files); }
});
$("composer").addEventListener("dragover", (e) => { e.preventDefault(); $("composer").classList.add("dragging"); });
$("composer").addEventListener("dragleave", () => $("composer").classList.remove("dragging"));
$("composer").addEventListener("drop", (e) => {
  e.preventDefault();
  $("composer").classList.remove("dragging");
  attach([...e.dataTransfer.files]);
});
$("reset").onclick = resetChat;
$("stop").onclick = () => running && running.abort();
$("add-example").onclick = () => exampleRow("");
$("query-image").onchange = async () => {
  const image = await chooseImage($("query-image").files[0]);
  $("query-thumb").dataset.image = image ? image.url : "";
  $("query-thumb").replaceChildren(...(image ? [thumbnail(image.display)] : []));
};
$("fs-generate").onclick = fewShotGenerate;
$("fs-rank").onclick = fewShotRank;
$("api-key").addEventListener("change", loadModel);
exampleRow("");
exampleRow("");
loadModel();
