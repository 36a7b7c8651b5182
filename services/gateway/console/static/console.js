// Bunch web console: plain browser JavaScript over the public HTTP API, no build step.
"use strict";

const KEY_STORAGE = "bunch.apiKey";
const FINAL = new Set(["completed", "failed", "canceled"]);
const $ = (selector, root = document) => root.querySelector(selector);

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

class ApiError extends Error {
  // `body` is the whole error answer: a 402 (over the project's budget) carries the figures too.
  constructor(status, detail, body = null) {
    super(status === 402 && body && body.limit_usd !== undefined ? overBudgetText(detail, body) : detail);
    this.status = status; this.body = body;
  }
}

function overBudgetText(detail, b) {
  return `${detail}\nThis job: ${usd(b.quote_usd)}; spent ${usd(b.spent_usd)} of ${usd(b.limit_usd)} this ${b.period}, ` +
    `${usd(b.remaining_usd)} left; the budget resets ${moment(b.resets_at)}.`;
}

// Every request that creates something (a job, an upload, a batch, a download, a retry, a redo) carries
// an Idempotency-Key made when the person's action starts: the gateway answers a repeat of that key
// with the first answer, so a request sent again never creates a second one. crypto.randomUUID exists
// only in secure contexts (https, localhost); a console opened over plain http elsewhere makes its
// UUIDv4 from getRandomValues, which every context has.
function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;  // version 4, RFC 4122 variant
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

async function api(path, { method = "GET", json, body, key } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  if (key) headers["Idempotency-Key"] = key;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  const response = await fetch(path, { method, headers, body });
  if (response.status === 204) return null;
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, (data && data.detail) || `HTTP ${response.status}`, data);
  return data;
}

// fetch() cannot report upload progress; XMLHttpRequest can. An upload creates something: `key` is its
// Idempotency-Key.
function upload(path, formData, onProgress, key) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.setRequestHeader("Idempotency-Key", key);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, (data && data.detail) || `HTTP ${xhr.status}`, data));
    };
    xhr.onerror = () => reject(new ApiError(0, "The server could not be reached."));
    xhr.send(formData);
  });
}

// A refresh that is asked for while one is in flight runs once more when that one ends, so the last
// refresh always starts after the last news and the page never ends on an older read. Dropping the
// request instead (or running both at once, whose answers may land out of order) could leave a
// finished job shown as still processing.
function coalesced(task) {
  let inFlight = null, again = false;
  async function loop() {
    do {
      again = false;
      try { await task(); } catch (err) { console.warn(err); }  // the next news tries again
    } while (again);
    inFlight = null;
  }
  return () => {
    if (inFlight) again = true;
    else inFlight = loop();
    return inFlight;
  };
}

// Of several calls, only the answer to the latest counts: an older one that lands later (a slow quote
// for what the form held a moment ago) resolves to null instead of overwriting the newer one.
// `cancel()` makes every call in flight stale (the form became incomplete meanwhile).
function latestOnly(task) {
  let latest = 0;
  const call = async (...args) => {
    const mine = ++latest;
    try {
      const value = await task(...args);
      return mine === latest ? { value } : null;
    } catch (err) {
      if (mine !== latest) return null;
      throw err;
    }
  };
  call.cancel = () => { latest++; };
  return call;
}

function debounced(task, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(task, ms); };
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
// Reconnects with Last-Event-ID, so no event still in the server's stream is missed.
function follow(path, onEvent, { stopWhen = () => false } = {}) {
  let lastId = null, stopped = false;
  const controller = new AbortController();
  async function connect() {
    while (!stopped) {
      try {
        const headers = { Authorization: `Bearer ${apiKey()}` };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers, signal: controller.signal });
        if (response.status === 204 || response.status === 404) return;
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
            const event = { type: "message", data: "" };
            for (const line of block.split("\n")) {
              if (line.startsWith("id:")) lastId = line.slice(3).trim();
              else if (line.startsWith("event:")) event.type = line.slice(6).trim();
              else if (line.startsWith("data:")) event.data += line.slice(5).trim();
            }
            if (!event.data) continue;
            const data = JSON.parse(event.data);
            onEvent(event.type, data);
            if (stopWhen(event.type, data)) { stop(); return; }
          }
        }
      } catch (err) {
        if (stopped) return;
      }
      await new Promise((r) => setTimeout(r, 1500));
    }
  }
  function stop() { stopped = true; controller.abort(); }
  connect();
  return { stop };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    // Through the CSSOM: the Content-Security-Policy refuses style attributes (style-src 'self').
    else if (name === "width") node.style.width = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function progressBar(progress) {
  const total = progress.images_total || 1;
  return el("div", { class: "bar", title: `${progress.images_succeeded} done, ${progress.images_failed} failed of ${progress.images_total}` },
    el("span", { width: `${(100 * (progress.images_succeeded + progress.images_failed)) / total}%` }),
    el("span", { class: "failed", width: `${(100 * progress.images_failed) / total}%` }));
}

function eta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// Dollars: cents from a dime up, two significant digits below (an image costs a few cents).
function usd(value) {
  if (value === null || value === undefined) return "–";
  const size = Math.abs(value);
  if (size === 0 || size >= 0.1) return `$${value.toFixed(2)}`;
  return `$${value.toFixed(Math.min(6, 1 - Math.floor(Math.log10(size))))}`;
}

function moment(iso) { return iso ? `at ${new Date(iso).toLocaleString()}` : "later"; }

// A job's lane: the field, else its cost's (older gateways had neither: every job was realtime).
function laneOf(job) { return job.lane || (job.cost && job.cost.lane) || "realtime"; }

function costText(cost) {
  return cost ? usd(cost.total_usd) : "";
}

function costTitle(cost) {
  if (!cost) return undefined;
  return `Gemini ${usd(cost.gemini_usd)} (${cost.prompt_tokens} prompt + ${cost.output_tokens} output tokens), ` +
    `RunPod ${usd(cost.runpod_usd)} (${Math.round(cost.runpod_seconds)} s)`;
}

function showError(target, err) { target.textContent = err.message; target.className = "error"; }
function showNotice(target, text) { target.textContent = text; target.className = "notice"; }

function setUpKeyBox() {
  const input = $("#api-key");
  input.value = apiKey();
  input.addEventListener("change", () => { localStorage.setItem(KEY_STORAGE, input.value.trim()); location.reload(); });
  for (const link of document.querySelectorAll("header nav a")) {
    if (link.getAttribute("href") === location.pathname) link.classList.add("active");
  }
}

// --- thumbnails of a job's results ---

function thumbnails(images, { selectable = false } = {}) {
  return images.filter((i) => i.status !== "pending").map((image) => {
    const box = el("label", { class: `thumb ${image.status}`, "data-index": image.index });
    if (image.status === "succeeded") box.append(el("img", { src: image.url, alt: `image ${image.index}`, loading: "lazy" }));
    else box.append(el("div", { class: "placeholder" }, `failed: ${image.error || "unknown"}`));
    const caption = el("div", { class: "caption" });
    if (selectable) caption.append(el("input", { type: "checkbox", value: image.index, class: "redo-pick" }));
    caption.append(`#${image.index}`);
    box.append(caption);
    return box;
  });
}

// /results comes in pages: the first is shown, "Show more" appends the next one.
async function showResults(jobId, container, { selectable = false } = {}) {
  const first = await api(`/api/jobs/${jobId}/results?limit=200`);
  const render = (page) => {
    const nodes = thumbnails(page.images, { selectable });
    if (page.next_cursor) {
      const more = el("button", { type: "button", class: "more" }, "Show more");
      more.onclick = async () => {
        more.disabled = true;
        const next = await api(`/api/jobs/${jobId}/results?limit=200&cursor=${encodeURIComponent(page.next_cursor)}`);
        more.replaceWith(...render(next));
      };
      nodes.push(more);
    }
    return nodes;
  };
  container.replaceChildren(...render(first));
  return first;
}

// --- the lane choice of a job form: each lane's price and wait, from POST /api/jobs/quote ---

function chosenLane(form) { return $("input[name=lane]:checked", form).value; }

function waitText(name, lane) {
  const known = (seconds) => seconds !== null && seconds !== undefined;
  if (name === "batch") {
    // A batch's wait and duration are both its expected turnaround: results come all at once.
    const turnaround = known(lane.expected_duration_seconds) ? lane.expected_duration_seconds : lane.expected_wait_seconds;
    return known(turnaround) ? `results in ~${eta(turnaround)}, at most 24 h` : "results within 24 h";
  }
  const parts = [];
  if (known(lane.expected_wait_seconds)) parts.push(`starts in ~${eta(lane.expected_wait_seconds)}`);
  if (known(lane.expected_duration_seconds)) parts.push(`takes ~${eta(lane.expected_duration_seconds)}`);
  return parts.join(", ");
}

// `bodyOf()` is the POST /api/jobs body the form holds now (lane included), null while the form is
// incomplete (nothing is asked then), or throws what keeps it from being complete (a failed upload).
// The quote is asked 300 ms after the last change, and only the latest answer is shown. `copies()`
// is how many such jobs one submit makes.
function laneQuotes(form, bodyOf, { copies = () => 1 } = {}) {
  const message = $("#quote-message"), budget = $("#budget"), cards = [...form.querySelectorAll(".lane")];
  for (const card of cards) card.dataset.about = $(".lane-wait", card).textContent;
  const quote = latestOnly((body) => api("/api/jobs/quote", { method: "POST", json: body }));

  function clear() {
    for (const card of cards) {
      $(".lane-total", card).textContent = ""; $(".lane-parts", card).textContent = "";
      $(".lane-wait", card).textContent = card.dataset.about;
    }
    budget.hidden = true;
  }

  function show(q) {
    for (const card of cards) {
      const lane = q.lanes[card.dataset.lane];
      if (!lane) continue;
      $(".lane-total", card).textContent = usd(lane.total_usd);
      $(".lane-parts", card).textContent = `Gemini ${usd(lane.gemini_usd)} · RunPod ${usd(lane.runpod_usd)} ` +
        `(${Math.round(lane.runpod_worker_seconds)} worker-s) · ${lane.runs} run(s)`;
      $(".lane-wait", card).textContent = waitText(card.dataset.lane, lane);
    }
    const n = copies(), total = q.lanes[q.lane].total_usd * n;
    message.textContent = `${q.images} image(s) with ${q.model}` + (n > 1 ? `; ${n} jobs: ${usd(total)} on the ${q.lane} lane.` : ".");
    message.className = "hint";
    // A submit is refused (402) over the budget; several copies may add up past it.
    const over = !q.within_budget || (q.budget !== null && total > q.budget.remaining_usd);
    const lines = [];
    if (q.budget) {
      const b = q.budget;
      lines.push(`Budget: ${usd(b.remaining_usd)} of ${usd(b.limit_usd)} left this ${b.period} (spent ${usd(b.spent_usd)}); resets ${moment(b.resets_at)}.`);
    }
    if (over) lines.push(`Over budget: ${usd(total)} on the ${q.lane} lane would be refused.`);
    budget.textContent = lines.join(" ");
    budget.className = over ? "error" : "hint";
    budget.hidden = !lines.length;
  }

  async function update() {
    let body;
    try {
      body = bodyOf();
    } catch (err) {
      quote.cancel(); clear(); showError(message, err); return;
    }
    if (!body) { quote.cancel(); clear(); message.textContent = "Prices show once the form is complete."; message.className = "hint"; return; }
    try {
      const answer = await quote(body);
      if (answer) show(answer.value);
    } catch (err) {
      clear(); showError(message, err);
    }
  }

  const later = debounced(update, 300);
  // Fields that are no part of the job (a saved batch's name) leave its price as it is.
  const edited = (event) => { if (!event.target.closest("[data-unpriced]")) later(); };
  form.addEventListener("input", edited);
  form.addEventListener("change", edited);
  later();
  return { refresh: later };
}

// Files are uploaded as soon as they are chosen (the quote needs their ids: their tokens count).
// `state` holds the latest choice: `pending` its upload, then `value` or `error`; an older upload
// that ends later is ignored.
function uploadOnChoice(inputs, send, onDone) {
  const state = { pending: null, value: null, error: null };
  const start = () => {
    const files = inputs.flatMap((input) => [...input.files]);
    state.value = null; state.error = null;
    const mine = state.pending = files.length ? send(files) : null;
    if (!mine) { onDone(); return; }
    mine.then((value) => { if (state.pending === mine) { state.value = value; onDone(); } },
      (err) => { if (state.pending === mine) { state.error = err; onDone(); } });
  };
  for (const input of inputs) input.addEventListener("change", start);
  return state;
}

// --- semi-automatic page: submit jobs, and the live queue ---

function semiBody(form, referenceIds) {
  const prompts = $("#prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  if (!form.checkValidity() || !prompts.length) return null;
  return {
    mode: "semi_auto", group: $("#new-group").value.trim() || $("#group-select").value || "default", prompts,
    reference_ids: referenceIds, images_per_prompt: Number($("#batch").value), priority: Number($("#priority").value),
    lane: chosenLane(form),
  };
}

async function semiAutoPage() {
  const form = $("#semi-form"), message = $("#semi-message");
  await loadGroups($("#group-select"));
  const refs = uploadOnChoice([$("#references")], async (files) => {
    const data = new FormData();
    for (const file of files) data.append("files", file);
    return (await upload("/api/uploads", data, () => {}, newKey())).uploads.map((u) => u.id);
  }, () => quotes.refresh());
  const referenceIds = () => (refs.pending ? refs.value : []);
  const copies = () => Number($("#copies").value) || 1;
  const quotes = laneQuotes(form, () => {
    if (refs.error) throw refs.error;
    const ids = referenceIds();
    return ids ? semiBody(form, ids) : null;
  }, { copies });
  // The job the form holds once its references are uploaded: what Submit queues and Save keeps.
  const formBody = async () => {
    const body = semiBody(form, refs.pending ? await refs.pending : []);
    if (!body) throw new Error("Enter at least one prompt.");
    return body;
  };
  const batches = savedBatches({ onQueued: () => quotes.refresh() });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("button[type=submit]", form);
    button.disabled = true;
    try {
      const body = await formBody();
      const n = copies();
      // Each copy is a job of its own, so a key of its own: one key for all would give the first job back n times.
      const keys = Array.from({ length: n }, newKey);
      for (const key of keys) await api("/api/jobs", { method: "POST", json: body, key });
      showNotice(message, `${n} ${body.lane === "batch" ? "batch " : ""}job${n > 1 ? "s" : ""} submitted.`);
      await refreshQueue();
    } catch (err) {
      showError(message, err);
    } finally {
      button.disabled = false;
      quotes.refresh();  // the budget has less left
    }
  });
  $("#batch").addEventListener("input", () => {
    const n = Number($("#batch").value) || 0;
    $("#batch-hint").textContent = `${Math.ceil(n / 4)} run(s) of up to 4 images per prompt`;
  });
  saveAsBatch(formBody, batches);
  await Promise.all([refreshQueue(), batches.refresh()]);
  // Every status or progress event re-reads the listing: it carries the ETA and ZIP link too.
  follow("/api/events", (type) => { if (type !== "snapshot") refreshQueue(); });
}

// "Save as batch": the body Submit would send, plus the name, kept by POST /api/batches; nothing is queued.
function saveAsBatch(formBody, batches) {
  const button = $("#save-batch"), name = $("#batch-name"), message = $("#save-message");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const body = await formBody(), label = name.value.trim();
      // A blank name is left out, not sent as "": the API takes names of at least one character.
      const batch = await api("/api/batches", { method: "POST", json: label ? { ...body, name: label } : body, key: newKey() });
      showNotice(message, `Saved ${batchTitle(batch)}: ${batchShape(batch)} (${batch.images} images), not queued.`);
      name.value = "";
      await batches.saved(batch);
    } catch (err) {
      showError(message, err);
    } finally {
      button.disabled = false;
    }
  });
  // Enter in a text field submits its form, which would queue a job instead of saving it.
  name.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); button.click(); }
  });
}

function batchTitle(batch) { return batch.name ? `"${batch.name}"` : `batch ${batch.id.slice(0, 8)}`; }
function batchShape(batch) { return `${batch.rows} × ${batch.columns.length}`; }

// The project's saved batches, newest first, 50 a page ("Show more" appends the next); each can be
// queued (its job then shows in the queue like a submitted one) or deleted (refused while a job
// queued from it is unfinished: the 409's reason is shown).
function savedBatches({ onQueued }) {
  const list = $("#batches tbody"), message = $("#batches-message"), more = $("#more-batches");
  let fresh = null;  // the batch saved last on this page: its row is marked
  let listing = 0;   // a "Show more" that lands after a refresh must not append to the new list

  const rows = (batches) => batches.map((batch) => el("tr", { "data-batch": batch.id, class: batch.id === fresh ? "fresh" : null },
    el("td", { title: batch.id }, batch.name || el("span", { class: "hint" }, batch.id.slice(0, 8))),
    el("td", { title: `${batch.images} image(s)` }, batchShape(batch)),
    el("td", {}, batch.lane),
    el("td", {}, new Date(batch.created_at).toLocaleString()),
    el("td", {}, batch.latest_job_id ? el("code", {}, batch.latest_job_id.slice(0, 8)) : ""),
    el("td", {}, el("div", { class: "row-actions" },
      el("button", { class: "secondary", onclick: (event) => queue(batch, event.currentTarget) }, "Queue"),
      el("button", { class: "danger", onclick: (event) => remove(batch, event.currentTarget) }, "Delete")))));

  function offerMore(cursor, mine) {
    more.hidden = !cursor;
    more.onclick = async () => {
      more.disabled = true;
      try {
        const page = await api(`/api/batches?limit=50&cursor=${encodeURIComponent(cursor)}`);
        if (mine !== listing) return;
        list.append(...rows(page.batches));
        offerMore(page.next_cursor, mine);
      } catch (err) {
        showError(message, err);
      } finally {
        more.disabled = false;
      }
    };
  }

  const refresh = coalesced(async () => {
    const mine = ++listing;
    try {
      const page = await api("/api/batches?limit=50");
      list.replaceChildren(...rows(page.batches));
      if (!page.batches.length) list.append(el("tr", {}, el("td", { colspan: 6, class: "hint" }, "No saved batches yet: fill the form above and save it as a batch.")));
      offerMore(page.next_cursor, mine);
    } catch (err) {
      showError(message, err);
    }
  });

  async function queue(batch, button) {
    button.disabled = true;
    try {
      const job = await api(`/api/batches/${batch.id}/jobs`, { method: "POST", json: {}, key: newKey() });
      showNotice(message, `Queued ${batchTitle(batch)}: job ${job.id.slice(0, 8)}.`);
      onQueued();  // the budget has less left
      await Promise.all([refreshQueue(), refresh()]);
    } catch (err) {
      showError(message, err);
      button.disabled = false;
    }
  }

  async function remove(batch, button) {
    button.disabled = true;
    try {
      await api(`/api/batches/${batch.id}`, { method: "DELETE" });
      showNotice(message, `Deleted ${batchTitle(batch)}.`);
      await refresh();
    } catch (err) {
      showError(message, err);
      button.disabled = false;
    }
  }

  return { refresh, saved: (batch) => { fresh = batch.id; return refresh(); } };
}

const NO_JOBS = "No jobs yet.";
const refreshQueue = coalesced(async () => {
  const body = $("#queue tbody");
  try {
    const listing = await api("/api/jobs?limit=100"), message = $("#queue-message");
    body.replaceChildren(...listing.jobs.map(queueRow));
    // The hint goes once a job comes (a notice there, "Job canceled.", stays).
    if (!listing.jobs.length) message.textContent = NO_JOBS;
    else if (message.textContent === NO_JOBS) message.textContent = "";
  } catch (err) {
    showError($("#queue-message"), err);
  }
});

function queueRow(job) {
  const row = el("tr", { "data-job": job.id });
  fillRow(row, job);
  return row;
}

function fillRow(row, job) {
  const p = job.progress;
  const actions = el("div", { class: "row-actions" });
  if (job.status === "queued" || job.status === "processing") {
    actions.append(el("button", { class: "danger", onclick: () => control(job.id, "cancel") }, "Cancel"));
  }
  if (job.status === "failed") actions.append(el("button", { class: "secondary", onclick: () => control(job.id, "retry") }, "Retry"));
  if (FINAL.has(job.status)) actions.append(el("button", { class: "secondary", onclick: () => showJob(job.id) }, "Images"));
  if (job.zip && job.zip.ready) actions.append(el("button", { onclick: () => { location.href = job.zip.url; } }, "Download ZIP"));
  row.replaceChildren(
    el("td", {}, el("code", {}, job.id.slice(0, 8))),
    el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
    el("td", { class: "lane-cell" }, laneOf(job)),
    el("td", {}, job.group),
    el("td", {}, `${p.images_total}`),
    el("td", {}, progressBar(p), el("span", { class: "hint" }, `${p.images_succeeded + p.images_failed}/${p.images_total} · runs ${p.runs_done}/${p.runs_total}`)),
    el("td", {}, eta(job.eta_seconds)),
    el("td", { class: "cost-cell", title: costTitle(job.cost) }, costText(job.cost)),
    el("td", {}, actions),
  );
}

async function control(jobId, action) {
  try {
    // A retry creates a job; a cancel creates nothing (a repeat is refused: the job is canceled already).
    await api(`/api/jobs/${jobId}/${action}`, { method: "POST", key: action === "retry" ? newKey() : undefined });
    showNotice($("#queue-message"), action === "retry" ? "Retry submitted." : "Job canceled.");
    await refreshQueue();
  } catch (err) {
    showError($("#queue-message"), err);
  }
}

async function showJob(jobId) {
  const panel = $("#job-panel"), results = await showResults(jobId, $("#job-thumbs"), { selectable: true });
  panel.hidden = false;
  const cost = results.cost ? `, cost ${costText(results.cost)}` : "";
  $("#job-title").textContent = `Job ${jobId.slice(0, 8)} — ${results.status} (${laneOf(results)} lane${cost})`;
  $("#redo").onclick = async () => {
    const indices = [...document.querySelectorAll(".redo-pick:checked")].map((box) => Number(box.value));
    if (!indices.length) { showError($("#job-message"), new Error("Pick the images to redo first.")); return; }
    try {
      await api(`/api/jobs/${jobId}/redo`, { method: "POST", json: { indices }, key: newKey() });
      showNotice($("#job-message"), `Redoing ${indices.length} image(s).`);
      await refreshQueue();
    } catch (err) {
      showError($("#job-message"), err);
    }
  };
}

async function loadGroups(select) {
  try {
    const { groups } = await api("/api/groups");
    select.replaceChildren(el("option", { value: "" }, "default"), ...groups.map((g) => el("option", { value: g.id }, g.name)));
  } catch (err) { /* the key box says what is wrong */ }
}

// --- automatic page: a dataset, a base prompt, live progress and thumbnails ---

function autoBody(form, datasetId) {
  if (!form.checkValidity() || !$("#base-prompt").value.trim()) return null;
  return {
    mode: "automatic", group: $("#auto-group").value.trim() || "default", base_prompt: $("#base-prompt").value,
    dataset_id: datasetId, variations_per_image: Number($("#variations").value), lane: chosenLane(form),
  };
}

async function automaticPage() {
  const form = $("#auto-form"), message = $("#auto-message");
  const dataset = uploadOnChoice([$("#dataset"), $("#dataset-folder")], async (files) => {
    const data = new FormData();
    for (const file of files) data.append("files", file, file.webkitRelativePath || file.name);
    const bar = $("#upload-bar > span");
    bar.style.width = "0%";
    $("#rejected").textContent = "";
    const uploaded = await upload("/api/datasets", data, (share) => { bar.style.width = `${Math.round(share * 100)}%`; }, newKey());
    const rejected = uploaded.rejected.map((r) => `${r.name}: ${r.reason}`).join("\n");
    $("#rejected").textContent = rejected ? `Rejected:\n${rejected}` : "";
    return uploaded;
  }, () => quotes.refresh());
  const quotes = laneQuotes(form, () => {
    if (dataset.error) throw dataset.error;
    return dataset.value ? autoBody(form, dataset.value.id) : null;
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("button[type=submit]", form);
    button.disabled = true;
    message.textContent = "";
    try {
      if (!dataset.pending) throw new Error("Choose a ZIP of images or a folder of image files.");
      const uploaded = await dataset.pending;
      const body = autoBody(form, uploaded.id);
      if (!body) throw new Error("Enter a base prompt.");
      const job = await api("/api/jobs", { method: "POST", json: body, key: newKey() });
      showNotice(message, `${uploaded.count} image(s) accepted; ${body.lane} job ${job.id.slice(0, 8)} started.`);
      watchJob(job.id);
    } catch (err) {
      showError(message, err);
    } finally {
      button.disabled = false;
      quotes.refresh();
    }
  });
}

function watchJob(jobId) {
  const panel = $("#progress-panel");
  panel.hidden = false;
  const refresh = coalesced(async () => {
    const [status] = await Promise.all([api(`/api/jobs/${jobId}/status`), showResults(jobId, $("#thumbs"))]);
    const p = status.progress;
    $("#job-status").replaceChildren(el("span", { class: `status ${status.status}` }, status.status));
    $("#job-bar").replaceChildren(progressBar(p));
    $("#job-counts").innerHTML = "";
    $("#job-counts").append(
      el("span", {}, "done ", el("b", {}, `${p.images_succeeded}`)), el("span", {}, "failed ", el("b", {}, `${p.images_failed}`)),
      el("span", {}, "total ", el("b", {}, `${p.images_total}`)), el("span", {}, "runs ", el("b", {}, `${p.runs_done}/${p.runs_total}`)),
      el("span", {}, "ETA ", el("b", {}, eta(status.eta_seconds) || "–")),
      el("span", {}, "lane ", el("b", {}, laneOf(status))),
      el("span", { title: costTitle(status.cost) }, "cost ", el("b", {}, costText(status.cost) || "–")));
    const download = $("#download");
    download.disabled = !status.zip.ready;
    download.onclick = () => { location.href = status.zip.url; };
  });
  refresh();
  // Every event (progress, then the final status, which comes once the ZIP is written) re-reads
  // the job: counts, new thumbnails, and at the end the download link.
  follow(`/api/jobs/${jobId}/events`, () => refresh(), { stopWhen: (type, data) => type !== "snapshot" && FINAL.has(data.status) });
}

// --- groups page: a group's images, and one download of several groups ---

async function groupsPage() {
  const list = $("#groups tbody"), message = $("#groups-message");
  try {
    const { groups } = await api("/api/groups");
    list.replaceChildren(...groups.map((g) => el("tr", {},
      el("td", {}, el("input", { type: "checkbox", class: "group-pick", value: g.id })),
      el("td", {}, g.name), el("td", {}, `${g.job_count}`),
      el("td", {}, el("button", { class: "secondary", onclick: () => showGroup(g.id) }, "View")))));
    if (!groups.length) message.textContent = "No groups yet: jobs create their group when submitted.";
  } catch (err) {
    showError(message, err);
  }
  $("#download-groups").addEventListener("click", async () => {
    const ids = [...document.querySelectorAll(".group-pick:checked")].map((box) => box.value);
    if (!ids.length) { showError(message, new Error("Pick at least one group.")); return; }
    try {
      const { id } = await api("/api/downloads", { method: "POST", json: { group_ids: ids }, key: newKey() });
      showNotice(message, "Building the download…");
      for (;;) {
        const download = await api(`/api/downloads/${id}`);
        if (download.status === "ready") {
          const link = $("#download-link");
          link.href = download.url; link.hidden = false;
          link.textContent = download.zip.ready ? `Download ZIP (${download.image_count} images)` : "Download the image";
          showNotice(message, "Ready.");
          return;
        }
        if (download.status === "failed") throw new Error(download.error || "The download failed.");
        await new Promise((r) => setTimeout(r, 700));
      }
    } catch (err) {
      showError(message, err);
    }
  });
  exportGroups();
}

// --- exports of the selected groups to one of the project's own buckets ---

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = n || 0, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit++; }
  return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
}

// The action is offered only when the operator set up destinations for the project; the export's
// progress is then polled every second until it ends (a newer export takes over the panel).
async function exportGroups() {
  const open = $("#export-groups"), hint = $("#export-hint"), panel = $("#export-panel"), form = $("#export-form");
  const select = $("#export-destination"), message = $("#export-message"), start = $("#export-start");
  let destinations = [];
  try {
    ({ destinations } = await api("/api/exports/destinations"));
  } catch (err) {
    // A gateway without exports has none to offer; a wrong key already shows on the groups list.
  }
  if (!destinations.length) { hint.hidden = false; open.title = hint.textContent; return; }
  select.replaceChildren(...destinations.map((d) =>
    el("option", { value: d.name }, `${d.name} — ${d.bucket}${d.prefix ? `/${d.prefix}` : ""} (${d.endpoint})`)));
  open.disabled = false;
  open.addEventListener("click", () => { panel.hidden = false; select.focus(); });
  $("#export-close").addEventListener("click", () => { panel.hidden = true; });
  let latest = 0;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const ids = [...document.querySelectorAll(".group-pick:checked")].map((box) => box.value);
    if (!ids.length) { showError(message, new Error("Pick at least one group.")); return; }
    const body = {
      destination: select.value, group_ids: ids, include_manifest: $("#export-manifest").checked,
      layout: $("input[name=export-layout]:checked", form).value,
    };
    start.disabled = true;
    try {
      const created = await api("/api/exports", { method: "POST", json: body, key: newKey() });
      showNotice(message, `Export ${created.id.slice(0, 8)} of ${ids.length} group(s) to ${body.destination} started.`);
      const mine = ++latest;
      watchExport(created.id, () => mine === latest);
    } catch (err) {
      showError(message, err);
    } finally {
      start.disabled = false;
    }
  });
}

async function watchExport(exportId, current) {
  $("#export-progress").hidden = false;
  const problem = $("#export-error");
  for (let failures = 0; current();) {
    try {
      const view = await api(`/api/exports/${exportId}`);
      failures = 0;
      if (!current()) return;
      showExport(view);
      if (FINAL.has(view.status)) return;
    } catch (err) {
      if (!current()) return;
      showError(problem, err);
      problem.hidden = false;
      // A refusal (the export is gone, the key changed) stays one; a network blip or a 5xx may pass.
      if ((err.status >= 400 && err.status < 500) || ++failures > 60) return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function showExport(view) {
  const p = view.progress, total = p.objects_total;
  const known = total !== null && total !== undefined;
  $("#export-status").replaceChildren(el("span", { class: `status ${view.status}` }, view.status));
  $("#export-counts").textContent = `${known ? `${p.objects_done}/${total} objects` : "counting the objects…"} · ` +
    `${p.objects_copied} copied · ${p.objects_skipped} skipped · ${p.objects_failed} failed · ${bytes(p.bytes_copied)}`;
  const share = (n) => `${total ? (100 * n) / total : 0}%`;
  $("#export-bar").replaceChildren(el("div", { class: "bar", title: `${p.objects_done} of ${known ? total : "?"} objects` },
    el("span", { width: share(p.objects_done) }), el("span", { class: "failed", width: share(p.objects_failed) })));
  const problem = $("#export-error");
  problem.textContent = view.error || "";
  problem.className = "error";
  problem.hidden = !view.error;
  const items = (view.errors || []).map((e) => el("li", {}, `${e.object || `job ${e.job_id} image ${e.index}`}: ${e.reason}`));
  if (view.errors_truncated) items.push(el("li", { class: "hint" }, "More objects failed than are listed here."));
  $("#export-errors").replaceChildren(...items);
}

// A group's images come in pages like a job's results: "Show more" appends the next one. A page
// looks at a bounded number of image slots, so it may hold none and still have a next one: those
// are followed at once, a few at a time, rather than shown as empty.
async function groupImages(groupId, cursor) {
  let page;
  for (let empty = 0; empty < 10; empty++) {
    const after = cursor ? `&image_cursor=${encodeURIComponent(cursor)}` : "";
    page = await api(`/api/groups/${groupId}?job_limit=0&image_limit=200${after}`);
    if (page.images.length || !page.next_image_cursor) break;
    cursor = page.next_image_cursor;
  }
  return page;
}

async function showGroup(groupId) {
  const first = await groupImages(groupId);
  const render = (page) => {
    const nodes = thumbnails(page.images.map((image) => ({ ...image, status: "succeeded" })));
    if (page.next_image_cursor) {
      const more = el("button", { type: "button", class: "more" }, "Show more");
      more.onclick = async () => {
        more.disabled = true;
        more.replaceWith(...render(await groupImages(groupId, page.next_image_cursor)));
      };
      nodes.push(more);
    }
    return nodes;
  };
  $("#group-panel").hidden = false;
  $("#group-title").textContent = `${first.name} — ${first.images_total} image(s) in ${first.job_count} job(s)`;
  $("#group-thumbs").replaceChildren(...render(first));
}

// The whole queue's state on every page: a hold (every new run would fail upstream) and RunPod's workers.
async function showUpstream() {
  try {
    const stats = await api("/api/queue/stats");
    const hold = stats.upstream_hold, banner = $("#upstream");
    banner.hidden = !hold;
    if (hold) {
      const ends = hold.until ? `resumes by itself at ${new Date(hold.until).toLocaleString()}` : "resumes when an operator releases it";
      banner.textContent = `New runs are on hold (${hold.reason}): ${hold.detail}. Runs in flight finish; ${ends}.`;
    }
    const workers = stats.runpod, line = $("#runpod-workers");
    line.hidden = !workers;
    if (workers) {
      line.textContent = `RunPod workers: ${workers.workers_idle} idle, ${workers.workers_running} running, ` +
        `${workers.workers_throttled} throttled, ${workers.workers_unhealthy} unhealthy; ${workers.jobs_in_queue} run(s) in RunPod's queue`;
    }
  } catch (err) {
    // The page's own calls report errors; this banner just stays as it was.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeyBox();
  if (!apiKey()) { $("main").prepend(el("section", { class: "error" }, "Enter your API key at the top right (make dev prints one).")); return; }
  const page = document.body.dataset.page;
  showUpstream();
  setInterval(showUpstream, 15000);
  ({ semi: semiAutoPage, automatic: automaticPage, groups: groupsPage })[page]();
});
