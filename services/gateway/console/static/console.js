// Bunch web console: plain browser JavaScript over the public HTTP API, no build step.
"use strict";

const KEY_STORAGE = "bunch.apiKey";
const FINAL = new Set(["completed", "failed", "canceled"]);
const $ = (selector, root = document) => root.querySelector(selector);

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, { method = "GET", json, body } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  const response = await fetch(path, { method, headers, body });
  if (response.status === 204) return null;
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, (data && data.detail) || `HTTP ${response.status}`);
  return data;
}

// fetch() cannot report upload progress; XMLHttpRequest can.
function upload(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, (data && data.detail) || `HTTP ${xhr.status}`));
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
  return `${Math.round(seconds / 60)} min`;
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

// --- semi-automatic page: submit jobs, and the live queue ---

async function semiAutoPage() {
  const form = $("#semi-form"), message = $("#semi-message");
  await loadGroups($("#group-select"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("button[type=submit]", form);
    button.disabled = true;
    try {
      const prompts = $("#prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
      const group = $("#new-group").value.trim() || $("#group-select").value || "default";
      const files = $("#references").files;
      let referenceIds = [];
      if (files.length) {
        const data = new FormData();
        for (const file of files) data.append("files", file);
        const uploaded = await upload("/api/uploads", data, () => {});
        referenceIds = uploaded.uploads.map((u) => u.id);
      }
      const copies = Number($("#copies").value) || 1;
      for (let n = 0; n < copies; n++) {
        await api("/api/jobs", { method: "POST", json: {
          mode: "semi_auto", group, prompts, reference_ids: referenceIds,
          images_per_prompt: Number($("#batch").value), priority: Number($("#priority").value),
        } });
      }
      showNotice(message, `${copies} job${copies > 1 ? "s" : ""} submitted.`);
      await refreshQueue();
    } catch (err) {
      showError(message, err);
    } finally {
      button.disabled = false;
    }
  });
  $("#batch").addEventListener("input", () => {
    const n = Number($("#batch").value) || 0;
    $("#batch-hint").textContent = `${Math.ceil(n / 4)} run(s) of up to 4 images per prompt`;
  });
  await refreshQueue();
  // Every status or progress event re-reads the listing: it carries the ETA and ZIP link too.
  follow("/api/events", (type) => { if (type !== "snapshot") refreshQueue(); });
}

const refreshQueue = coalesced(async () => {
  const body = $("#queue tbody");
  try {
    const listing = await api("/api/jobs?limit=100");
    body.replaceChildren(...listing.jobs.map(queueRow));
    if (!listing.jobs.length) $("#queue-message").textContent = "No jobs yet.";
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
    el("td", {}, job.group),
    el("td", {}, `${p.images_total}`),
    el("td", {}, progressBar(p), el("span", { class: "hint" }, `${p.images_succeeded + p.images_failed}/${p.images_total} · runs ${p.runs_done}/${p.runs_total}`)),
    el("td", {}, eta(job.eta_seconds)),
    el("td", {}, actions),
  );
}

async function control(jobId, action) {
  try {
    await api(`/api/jobs/${jobId}/${action}`, { method: "POST" });
    showNotice($("#queue-message"), action === "retry" ? "Retry submitted." : "Job canceled.");
    await refreshQueue();
  } catch (err) {
    showError($("#queue-message"), err);
  }
}

async function showJob(jobId) {
  const panel = $("#job-panel"), results = await showResults(jobId, $("#job-thumbs"), { selectable: true });
  panel.hidden = false;
  $("#job-title").textContent = `Job ${jobId.slice(0, 8)} — ${results.status}`;
  $("#redo").onclick = async () => {
    const indices = [...document.querySelectorAll(".redo-pick:checked")].map((box) => Number(box.value));
    if (!indices.length) { showError($("#job-message"), new Error("Pick the images to redo first.")); return; }
    try {
      await api(`/api/jobs/${jobId}/redo`, { method: "POST", json: { indices } });
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

async function automaticPage() {
  const form = $("#auto-form"), message = $("#auto-message");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("button[type=submit]", form);
    button.disabled = true;
    message.textContent = "";
    try {
      const files = [...$("#dataset").files, ...$("#dataset-folder").files];
      if (!files.length) throw new Error("Choose a ZIP of images or a folder of image files.");
      const data = new FormData();
      for (const file of files) data.append("files", file, file.webkitRelativePath || file.name);
      const bar = $("#upload-bar > span");
      const dataset = await upload("/api/datasets", data, (share) => { bar.style.width = `${Math.round(share * 100)}%`; });
      const rejected = dataset.rejected.map((r) => `${r.name}: ${r.reason}`).join("\n");
      $("#rejected").textContent = rejected ? `Rejected:\n${rejected}` : "";
      const job = await api("/api/jobs", { method: "POST", json: {
        mode: "automatic", group: $("#auto-group").value.trim() || "default", base_prompt: $("#base-prompt").value,
        dataset_id: dataset.id, variations_per_image: Number($("#variations").value),
      } });
      showNotice(message, `${dataset.count} image(s) accepted; job ${job.id.slice(0, 8)} started.`);
      watchJob(job.id);
    } catch (err) {
      showError(message, err);
    } finally {
      button.disabled = false;
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
      el("span", {}, "ETA ", el("b", {}, eta(status.eta_seconds) || "–")));
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
      const { id } = await api("/api/downloads", { method: "POST", json: { group_ids: ids } });
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
