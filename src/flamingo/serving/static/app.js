// The chat page: plain JavaScript over the server's own OpenAI-compatible API (no build step, no CDN).
"use strict";

const MAX_SIDE = 1024;  // images are scaled down in the browser before upload (the encoder sees ~224 px)
const $ = (id) => document.getElementById(id);
const server = { model: null, mediaToken: "<image>", endOfChunk: "<|endofchunk|>", maxImages: 16 };
let history = [];       // OpenAI chat messages of this conversation
let attachments = [];   // data URLs waiting for the next message
let running = null;     // AbortController of the request in flight

// ------------------------------------------------------------------------------------- API
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : "HTTP " + response.status;
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
        if (chunk.error) throw new Error(chunk.error.message);
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
    $("model-name").textContent = card.id;
    setStatus("");
  } catch (e) {
    $("model-name").textContent = "not connected";
    setStatus(String(e.message || e));
  }
}

// ---------------------------------------------------------------------------------- images
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// A data URL of the image, scaled so that its longer side is at most MAX_SIDE.
async function imageDataURL(file) {
  const original = await readFile(file);
  const image = new Image();
  image.src = original;
  await image.decode();
  const scale = MAX_SIDE / Math.max(image.naturalWidth, image.naturalHeight);
  if (scale >= 1) return original;
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(image.naturalWidth * scale);
  canvas.height = Math.round(image.naturalHeight * scale);
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.92);
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
      attachments.push(await imageDataURL(file));
    } catch (e) {
      setStatus("could not read " + file.name + ": " + e);
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren(...attachments.map((url, i) =>
    thumbnail(url, () => { attachments.splice(i, 1); renderAttachments(); })));
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
  const content = attachments.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  addMessage("user", text, attachments);
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
    row.dataset.image = input.files[0] ? await imageDataURL(input.files[0]) : "";
    thumbs.replaceChildren(...(row.dataset.image ? [thumbnail(row.dataset.image)] : []));
  };
  row.append(thumbs, label, answer, remove);
  $("examples").appendChild(row);
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
  const file = $("query-image").files[0];
  $("query-thumb").dataset.image = file ? await imageDataURL(file) : "";
  $("query-thumb").replaceChildren(...(file ? [thumbnail($("query-thumb").dataset.image)] : []));
};
$("fs-generate").onclick = fewShotGenerate;
$("fs-rank").onclick = fewShotRank;
$("api-key").addEventListener("change", loadModel);
exampleRow("");
exampleRow("");
loadModel();
