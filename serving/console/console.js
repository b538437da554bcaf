// loraplex operator console: plain JS on the service's JSON routes (admin token as a bearer token).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("loraplex-token") || "", tenant: null, adapter: null, poll: null };

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  const type = res.headers.get("content-type") || "";
  const data = type.includes("application/json") ? await res.json() : await res.blob();
  if (!res.ok) {
    const err = new Error((data && data.message) || res.status + " " + res.statusText);
    err.status = res.status;
    throw err;
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmt(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : "–";
}

// -- navigation ---------------------------------------------------------------------------------
const VIEWS = ["login", "adapters", "jobs", "try", "cache"];

function show(view) {
  for (const v of VIEWS) $("view-" + v).hidden = v !== view;
  for (const b of document.querySelectorAll("nav button[data-view]")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  clearInterval(state.poll);
  if (view === "adapters") loadTenants();
  if (view === "jobs") { loadJobs(); state.poll = setInterval(loadJobs, 1000); }
  if (view === "cache") loadCache();
  const heading = $("view-" + view).querySelector("h2");
  if (heading) { heading.tabIndex = -1; heading.focus(); }
}

async function login(event) {
  event.preventDefault();
  state.token = $("token").value.trim();
  try {
    await api("GET", "/v1/admin/tenants");
  } catch (e) {
    say("Sign-in failed: " + e.message, true);
    return;
  }
  sessionStorage.setItem("loraplex-token", state.token);
  $("nav").hidden = false;
  say("Signed in.");
  show("adapters");
}

function logout() {
  sessionStorage.removeItem("loraplex-token");
  state.token = "";
  $("nav").hidden = true;
  say("Signed out.");
  show("login");
}

// -- tenants and adapters ------------------------------------------------------------------------
function pickList(ul, names, selected, onPick) {
  ul.replaceChildren(...names.map((n) => el("li", {}, el("button", {
    type: "button", "aria-pressed": String(n === selected), onclick: () => onPick(n),
  }, n))));
  if (!names.length) ul.append(el("li", {}, "none"));
}

async function loadTenants() {
  try {
    const { tenants } = await api("GET", "/v1/admin/tenants");
    pickList($("tenants"), tenants, state.tenant, selectTenant);
    if (state.tenant) await selectTenant(state.tenant);
  } catch (e) { say(e.message, true); }
}

async function selectTenant(tenant) {
  state.tenant = tenant;
  pickList($("tenants"), [...$("tenants").querySelectorAll("button")].map((b) => b.textContent), tenant, selectTenant);
  $("adapters-of").textContent = "of " + tenant;
  const { adapters } = await api("GET", `/v1/admin/tenants/${tenant}/adapters`);
  pickList($("adapters"), adapters.map((a) => a.name), state.adapter, selectAdapter);
  if (state.adapter && adapters.some((a) => a.name === state.adapter)) await selectAdapter(state.adapter);
  else $("adapter-detail").hidden = true;
}

async function selectAdapter(name) {
  state.adapter = name;
  pickList($("adapters"), [...$("adapters").querySelectorAll("button")].map((b) => b.textContent), name, selectAdapter);
  const base = `/v1/admin/tenants/${state.tenant}/adapters/${name}`;
  const view = await api("GET", base);
  $("detail-title").textContent = `${state.tenant}/${name}`;
  $("detail-aliases").textContent = Object.entries(view.aliases).map(([a, v]) => `${a} → ${v}`).join(", ") || "none";
  const rows = [...view.versions].reverse().map((v) => {
    const at = Object.entries(view.aliases).filter(([, n]) => n === v.version).map(([a]) => a);
    return el("tr", {},
      el("td", {}, `${v.version}${at.length ? " (" + at.join(", ") + ")" : ""}`),
      el("td", {}, v.kind), el("td", {}, (v.labels || []).join(", ")),
      el("td", {}, fmt(v.metrics && v.metrics.accuracy)), el("td", {}, fmt(v.metrics && v.metrics.macro_f1)),
      el("td", {}, (v.created_at || "").replace("T", " ").slice(0, 19)),
      el("td", {},
        el("button", { type: "button", id: `promote-${v.version}`, onclick: () => promote(v.version) }, `Promote v${v.version}`), " ",
        el("button", { type: "button", class: "danger", onclick: () => removeVersion(v.version) }, "Delete")));
  });
  $("versions").replaceChildren(...rows);
  $("adapter-detail").hidden = false;
}

async function promote(version) {
  const base = `/v1/admin/tenants/${state.tenant}/adapters/${state.adapter}`;
  try {
    await api("PUT", `${base}/aliases/production`, { version });
    say(`${state.tenant}/${state.adapter}: production → v${version}`);
    await selectAdapter(state.adapter);
  } catch (e) { say(e.message, true); }
}

async function rollback() {
  const base = `/v1/admin/tenants/${state.tenant}/adapters/${state.adapter}`;
  try {
    const r = await api("POST", `${base}/rollback`, { alias: "production" });
    say(`production rolled back from v${r.from_version} to v${r.version}`);
    await selectAdapter(state.adapter);
  } catch (e) { say(e.message, true); }
}

async function removeVersion(version) {
  const url = `/v1/admin/tenants/${state.tenant}/adapters/${state.adapter}/versions/${version}`;
  if (!confirm(`Delete ${state.tenant}/${state.adapter}@${version}?`)) return;
  try {
    await api("DELETE", url);
  } catch (e) {
    // Alias protection: the service refuses to delete a version an alias points at (409, naming them).
    if (e.status !== 409 || !confirm(`${e.message}\n\nDelete it anyway and remove those aliases?`)) {
      say(e.message, true);
      return;
    }
    try { await api("DELETE", url + "?force=true"); } catch (e2) { say(e2.message, true); return; }
  }
  say(`deleted v${version}`);
  await loadTenants();
}

// -- jobs ----------------------------------------------------------------------------------------
async function submitJob(event) {
  event.preventDefault();
  const tenant = $("job-tenant").value.trim();
  const form = new FormData();
  form.append("name", $("job-name").value.trim());
  form.append("strategy", $("job-strategy").value);
  const options = { epochs: Number($("job-epochs").value) };
  if ($("job-lr").value.trim()) options.lr = Number($("job-lr").value);
  form.append("options", JSON.stringify(options));
  if ($("job-alias").value.trim()) form.append("alias", $("job-alias").value.trim());
  form.append("dataset", $("job-file").files[0]);
  try {
    const job = await api("POST", `/v1/admin/tenants/${tenant}/jobs`, form);
    say(`job ${job.id} queued: ${job.dataset.rows} examples, ${Object.keys(job.dataset.labels).length} labels`);
    await loadJobs();
  } catch (e) { say("Job refused: " + e.message, true); }
}

function progressCell(job) {
  const p = job.progress;
  const total = (p.epochs || job.options.epochs) * (p.steps_per_epoch || 1);
  const done = p.steps_per_epoch ? (p.epoch - 1) * p.steps_per_epoch + p.step : 0;
  const value = job.status === "succeeded" ? total : Math.max(0, done);
  return el("td", {}, el("progress", { max: String(total), value: String(value), "aria-label": `job ${job.id} progress` }),
    ` epoch ${p.epoch}/${p.epochs || job.options.epochs}, step ${p.step}/${p.steps_per_epoch || "?"}`);
}

async function loadJobs() {
  let jobs;
  try { ({ jobs } = await api("GET", "/v1/admin/jobs")); } catch (e) { say(e.message, true); return; }
  $("jobs").replaceChildren(...jobs.map((j) => {
    const active = ["queued", "running", "registering"].includes(j.status);
    const result = j.status === "succeeded" ? `registered v${j.version}${j.alias ? " → " + j.alias : ""}` : (j.error || "");
    return el("tr", { id: `job-${j.id}` },
      el("td", {}, j.id), el("td", {}, `${j.tenant}/${j.name} (${j.strategy})`),
      el("td", { class: "job-status" }, j.status), progressCell(j),
      el("td", {}, fmt(j.progress.loss)), el("td", {}, fmt(j.progress.val && j.progress.val.accuracy)),
      el("td", {}, j.progress.eta_s == null ? "–" : `${Math.round(j.progress.eta_s)} s`),
      el("td", { class: "job-result" }, result),
      el("td", {},
        el("button", { type: "button", onclick: () => showCurve(j) }, "Curve"), " ",
        el("button", { type: "button", onclick: () => showLog(j) }, "Log"), " ",
        active ? el("button", { type: "button", class: "danger", onclick: () => cancelJob(j) }, "Cancel") : ""));
  }));
}

async function showCurve(job) {
  try {
    const png = await api("GET", `/v1/admin/tenants/${job.tenant}/jobs/${job.id}/curve.png`);
    $("curve").src = URL.createObjectURL(png);
    $("curve").alt = `training curve of job ${job.id}: train loss and validation macro-F1 per epoch`;
    $("curve-caption").textContent = `${job.tenant}/${job.name}, job ${job.id}`;
    $("curve-box").hidden = false;
  } catch (e) { say(e.message, true); }
}

async function showLog(job) {
  try {
    const text = await (await api("GET", `/v1/admin/tenants/${job.tenant}/jobs/${job.id}/log`)).text();
    $("job-log").textContent = text || "(empty)";
    $("job-log").hidden = false;
  } catch (e) { say(e.message, true); }
}

async function cancelJob(job) {
  try { await api("POST", `/v1/admin/tenants/${job.tenant}/jobs/${job.id}/cancel`); say(`job ${job.id} cancelled`); }
  catch (e) { say(e.message, true); }
  await loadJobs();
}

// -- try it --------------------------------------------------------------------------------------
async function tryIt(event) {
  event.preventDefault();
  const tenant = $("try-tenant").value.trim();
  try {
    const r = await api("POST", `/v1/admin/tenants/${tenant}/classify`,
      { adapter: $("try-adapter").value.trim(), text: $("try-text").value });
    const rows = r.labels.map((l, i) => el("li", {}, `${l}: ${r.scores[i].toFixed(3)}`));
    $("try-result").replaceChildren(el("p", {}, `${r.adapter}@${r.version} answered:`), el("ol", { class: "answer" }, ...rows));
  } catch (e) {
    $("try-result").replaceChildren(el("p", { class: "error" }, e.message));
  }
}

// -- cache and usage -----------------------------------------------------------------------------
async function loadCache() {
  try {
    const [cache, residents, usage] = await Promise.all([api("GET", "/v1/admin/cache"),
      api("GET", "/v1/admin/cache/residents"), api("GET", "/v1/admin/usage")]);
    $("residents").replaceChildren(...residents.residents.map((r) => el("tr", {},
      el("td", {}, `${r.tenant}/${r.name}`), el("td", {}, String(r.key).slice(0, 16)), el("td", {}, r.bytes),
      el("td", {}, r.pinned ? "yes" : "no"), el("td", {}, r.leases))));
    const counters = Object.entries(cache).filter(([, v]) => typeof v !== "object");
    $("cache").replaceChildren(...counters.map(([k, v]) =>
      el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, typeof v === "number" ? +v.toFixed(4) : v))));
    $("usage").replaceChildren(...Object.entries(usage.tenants).map(([t, u]) => el("tr", {},
      el("td", {}, t), el("td", {}, u.requests), el("td", {}, u.rows), el("td", {}, u.tokens),
      el("td", {}, u.rejected), el("td", {}, u.inflight_rows ?? "–"))));
  } catch (e) { say(e.message, true); }
}

// -- wiring --------------------------------------------------------------------------------------
$("login-form").addEventListener("submit", login);
$("logout").addEventListener("click", logout);
$("rollback").addEventListener("click", rollback);
$("job-form").addEventListener("submit", submitJob);
$("try-form").addEventListener("submit", tryIt);
$("cache-refresh").addEventListener("click", loadCache);
for (const b of document.querySelectorAll("nav button[data-view]")) b.addEventListener("click", () => show(b.dataset.view));
if (state.token) { $("nav").hidden = false; show("adapters"); } else show("login");
