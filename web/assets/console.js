// loraloop console: the little JavaScript the pages need. No framework, no build step.
// Everything is wired by element ids and data- attributes (the CSP forbids inline code).
"use strict";
function csrfToken() {
  const m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.content : "";
}

// ---------------------------------------------------------------- formatting
function fmtNum(x) {
  if (x === null || x === undefined || !isFinite(x)) return "";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a < 1e-3 || a >= 1e5) return x.toExponential(2);
  return String(Number(x.toFixed(4)));
}
function fmtDuration(secs) {
  if (!isFinite(secs) || secs < 0) return "unknown";
  const s = Math.round(secs);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// ---------------------------------------------------------------- new job form
function initJobForm() {
  const form = document.getElementById("job-form");
  if (!form) return;
  const preset = document.getElementById("job-preset");
  const target = document.getElementById("job-estimate");
  let presets = [];
  try { presets = JSON.parse(preset.dataset.presets || "[]"); } catch (_) { presets = []; }
  let timer = null;
  let seq = 0;
  function refreshEstimate() {
    if (!target) return;
    const params = new URLSearchParams(new FormData(form));
    params.delete("_csrf");
    const mine = ++seq;
    fetch("/jobs/estimate?" + params.toString(), { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => { if (mine === seq) target.innerHTML = html; })
      .catch(() => {});
  }
  function later() {
    clearTimeout(timer);
    timer = setTimeout(refreshEstimate, 250);
  }
  preset.addEventListener("change", () => {
    const p = presets.find((x) => x.name === preset.value);
    if (p) {
      for (const k of ["epochs", "learning_rate", "batch_size", "lora_r", "lora_alpha", "sequence_len", "val_set_size"]) {
        const el = form.elements.namedItem(k);
        if (el) el.value = p[k];
      }
    }
    later();
  });
  form.addEventListener("input", (e) => {
    // Editing a setting by hand makes it a custom run.
    if (e.target !== preset && e.target.name !== "dataset_id" && e.target.name !== "method") preset.value = "";
    later();
  });
  form.addEventListener("change", later);
}

// ---------------------------------------------------------------- job page: chart + log
function initJobPage() {
  const chartEl = document.getElementById("loss-chart");
  if (!chartEl) return;
  const log = document.getElementById("job-log");
  const statusEl = document.getElementById("job-status");
  const stepEl = document.getElementById("job-step");
  const progress = document.getElementById("job-progress");
  const remainingEl = document.getElementById("job-remaining");
  const cancelForm = document.getElementById("cancel-form");
  let total = Number(chartEl.dataset.total || 0);
  const lastRendered = Number((log && log.dataset.lastId) || 0);
  chartEl.textContent = "";

  // Columns: step, train loss, eval loss, learning rate.
  const data = [[], [], [], []];
  const byStep = new Map();
  let firstStep = null;
  let plot = null;
  let pending = false;

  function makePlot() {
    if (typeof window.uPlot !== "function") return null;
    const width = Math.max(chartEl.clientWidth || 300, 260);
    const opts = {
      width: width,
      height: Math.round(Math.min(320, Math.max(200, width * 0.5))),
      scales: { x: { time: false }, lr: { auto: true } },
      axes: [
        { label: "step" },
        { label: "loss" },
        { scale: "lr", side: 1, label: "learning rate", grid: { show: false },
          values: (u, vals) => vals.map((v) => fmtNum(v)), size: 70 },
      ],
      series: [
        { label: "step" },
        { label: "train loss", stroke: "#2f6fdf", width: 2, spanGaps: true },
        { label: "eval loss", stroke: "#c0392b", width: 2, spanGaps: true, points: { show: true, size: 6 } },
        { label: "learning rate", stroke: "#1e8e3e", width: 1, dash: [4, 4], scale: "lr", spanGaps: true },
      ],
    };
    return new window.uPlot(opts, data, chartEl);
  }

  function redraw() {
    pending = false;
    if (!plot) plot = makePlot();
    if (plot) plot.setData(data);
    chartEl.dataset.points = String(data[0].length);
  }
  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(redraw);
  }
  window.addEventListener("resize", () => {
    if (plot) plot.setSize({ width: Math.max(chartEl.clientWidth, 260), height: plot.height });
  });

  function point(step) {
    let i = byStep.get(step);
    if (i !== undefined) return i;
    // Steps arrive in order; an out-of-order one is inserted where it belongs.
    let at = data[0].length;
    while (at > 0 && data[0][at - 1] > step) at--;
    for (const col of data) col.splice(at, 0, null);
    data[0][at] = step;
    byStep.clear();
    data[0].forEach((s, j) => byStep.set(s, j));
    return at;
  }

  function line(ev) {
    const time = new Date(ev.created_at * 1000).toISOString().slice(11, 19);
    let body;
    if (ev.type === "step") {
      body = "step " + (ev.step || 0);
      if (ev.loss !== null) body += " · loss " + fmtNum(ev.loss);
      if (ev.learning_rate !== null) body += " · lr " + fmtNum(ev.learning_rate);
      if (ev.tokens_per_sec !== null) body += " · " + Math.round(ev.tokens_per_sec) + " tokens/s";
    } else if (ev.type === "eval") {
      body = "eval at step " + (ev.step || 0) + " · eval loss " + fmtNum(ev.eval_loss);
    } else {
      body = ev.message || "";
    }
    return time + " " + ev.type + " " + body;
  }

  function onEvent(e) {
    let ev;
    try { ev = JSON.parse(e.data); } catch (_) { return; }
    if (ev.type === "step" && ev.step !== null) {
      const i = point(ev.step);
      data[1][i] = ev.loss;
      data[3][i] = ev.learning_rate;
      if (firstStep === null) firstStep = { step: ev.step, t: ev.created_at };
      if (stepEl) stepEl.textContent = ev.step + " / " + (total || "?");
      if (progress) { progress.value = ev.step; if (total) progress.max = total; }
      if (statusEl && statusEl.textContent === "queued") statusEl.textContent = "running";
      if (remainingEl && total && ev.step > firstStep.step) {
        const per = (ev.created_at - firstStep.t) / (ev.step - firstStep.step);
        remainingEl.textContent = fmtDuration(per * (total - ev.step));
      }
    } else if (ev.type === "eval" && ev.step !== null) {
      const i = point(ev.step);
      data[2][i] = ev.eval_loss;
    } else if (ev.type === "state" && ev.data && ev.data.total_steps) {
      total = ev.data.total_steps;
      if (progress) progress.max = total;
    }
    schedule();
    if (log && ev.id > lastRendered) {
      const div = document.createElement("div");
      div.className = "ev";
      div.dataset.id = ev.id;
      div.dataset.kind = ev.type;
      div.textContent = line(ev);
      const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      log.appendChild(div);
      if (stick) log.scrollTop = log.scrollHeight;
    }
  }

  redraw();
  if (typeof window.EventSource !== "function") return;
  const source = new EventSource(chartEl.dataset.eventsUrl);
  for (const kind of ["step", "eval", "log", "state"]) source.addEventListener(kind, onEvent);
  source.addEventListener("done", (e) => {
    source.close();
    let job = null;
    try { job = JSON.parse(e.data); } catch (_) { job = null; }
    if (job && statusEl) {
      statusEl.textContent = job.status;
      statusEl.className = "status status-" + job.status;
      if (remainingEl) remainingEl.textContent = "–";
      const elapsedEl = document.getElementById("job-elapsed");
      if (elapsedEl && job.started_at && job.finished_at) {
        elapsedEl.textContent = fmtDuration(job.finished_at - job.started_at);
      }
      if (cancelForm) cancelForm.remove();
      if (job.status === "failed" && job.error && !document.getElementById("job-error")) {
        // The error is on the page after a reload; say so now.
        const p = document.createElement("p");
        p.className = "error";
        p.setAttribute("role", "alert");
        p.id = "job-error";
        p.textContent = "The job failed: " + job.error.message;
        statusEl.closest("section").prepend(p);
      }
    }
    chartEl.dataset.final = "true";
  });
}

// ---------------------------------------------------------------- classifier job page
// While the job is queued or running, the server-drawn page (chart, epoch table, status)
// is fetched again every two seconds and swapped in, until the job has ended.
(function () {
  const FINAL = ["succeeded", "failed", "cancelled"];
  function follow() {
    const el = document.getElementById("classifier-job");
    const url = el && el.dataset.follow;
    if (!url) return;
    setTimeout(function () {
      fetch(url, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          const next = new DOMParser().parseFromString(html, "text/html").getElementById("classifier-job");
          if (next) el.replaceWith(next);
          const status = next && next.querySelector("#classifier-status");
          if (status && FINAL.indexOf(status.dataset.status) < 0) follow();
        })
        .catch(function () { follow(); });
    }, 2000);
  }
  follow();
})();

// ---------------------------------------------------------------- playground
function initPlayground() {
  const form = document.getElementById("chat-form");
  if (!form) return;
  const input = document.getElementById("chat-input");
  const log = document.getElementById("chat-log");
  const select = document.getElementById("adapter-select");
  const button = document.getElementById("chat-send");

  function bubble(role, text) {
    const empty = log.querySelector(".empty-chat");
    if (empty) empty.remove();
    const div = document.createElement("div");
    div.className = "msg " + role;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    div.append(meta, body);
    log.appendChild(div);
    div.scrollIntoView({ block: "end" });
    return div;
  }

  // Server-sent events from a fetch() body: `event:` and `data:` lines, blank line ends one.
  async function readEvents(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message";
        const lines = [];
        for (const l of block.split("\n")) {
          if (l.startsWith("event:")) name = l.slice(6).trim();
          else if (l.startsWith("data:")) lines.push(l.slice(5).replace(/^ /, ""));
        }
        if (lines.length) onEvent(name, lines.join("\n"));
      }
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const message = input.value;
    if (!message.trim()) return;
    const adapter = select ? select.value : "active";
    bubble("user", message);
    input.value = "";
    button.disabled = true;
    const reply = bubble("assistant", "");
    reply.dataset.adapter = "";
    const meta = reply.querySelector(".meta");
    const text = reply.querySelector(".text");
    reply.classList.add("pending");
    function setAdapter(name) {
      reply.dataset.adapter = name;
      meta.textContent = "assistant · " + name;
    }
    function showError(m) {
      reply.classList.add("failed");
      const p = document.createElement("div");
      p.className = "error";
      p.textContent = m;
      reply.appendChild(p);
    }
    try {
      // The form's action carries the assistant (?assistant=NAME).
      const resp = await fetch(form.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "text/event-stream", "X-CSRF-Token": csrfToken() },
        body: JSON.stringify({ message: message, adapter: adapter }),
      });
      if (!resp.ok) {
        let m = "the server answered " + resp.status;
        try { const j = await resp.json(); if (j.error && j.error.message) m = j.error.message; } catch (_) { /* not JSON */ }
        showError(m);
        return;
      }
      await readEvents(resp, (name, data) => {
        let v;
        try { v = JSON.parse(data); } catch (_) { return; }
        if (name === "started") setAdapter(v.adapter);
        else if (name === "queued") meta.textContent = "assistant · waiting, place " + v.position + " in line";
        else if (name === "text") { text.textContent += v; reply.scrollIntoView({ block: "end" }); }
        else if (name === "done") { setAdapter(v.adapter); reply.dataset.messageId = v.message_id; }
        else if (name === "error") showError(v.message);
      });
    } catch (err) {
      showError("the connection failed: " + err);
    } finally {
      reply.classList.remove("pending");
      button.disabled = false;
      input.focus();
    }
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
}

// ---------------------------------------------------------------- error pages
// "Back" returns to the page the operator came from (its href, home, when there is none).
function initBackLinks() {
  document.querySelectorAll("a[data-back]").forEach((a) => {
    a.addEventListener("click", (e) => {
      if (window.history.length > 1) {
        e.preventDefault();
        window.history.back();
      }
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  initBackLinks();
  initJobForm();
  initJobPage();
  initPlayground();
});
