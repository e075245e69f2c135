// posttrain feedback: the annotation page (/) and the admin page (/admin).
//
// Every text that came from a model, a samples file or a user is put into the page with
// textContent or createTextNode, never innerHTML: an "<img onerror=...>" in a response shows
// as those characters. (The Content-Security-Policy would also stop inline code from running.)
// State-changing requests carry the session's CSRF token in X-CSRF-Token (see auth.py).
"use strict";

const state = {
  csrf: null,
  me: null,
  offer: null, // the current lease: {lease, project, item, progress}
  order: [], // rank: displayed positions picked so far, best first
  choice: null, // pair: "A", "B" or "tie"
  flags: {}, // displayed position -> Set of flag names
  busy: false,
};
const FLAGS = [
  ["unsafe", "unsafe"],
  ["factually_wrong", "factually wrong"],
];

function $(id) {
  return document.getElementById(id);
}

// An element with attributes and children; string children become text nodes (never HTML).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = new Error((data && data.error) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

// ---- login, shared by both pages

async function whoAmI() {
  try {
    state.me = await api("GET", "/api/me");
    state.csrf = state.me.csrf;
    $("who").textContent = state.me.name + (state.me.admin ? " (admin)" : "");
    $("logout").hidden = false;
    $("login").hidden = true;
    return true;
  } catch (error) {
    if (error.status !== 401) say(error.message, true);
    $("login").hidden = false;
    $("token").focus();
    return false;
  }
}

function setUpLogin(onLoggedIn) {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    try {
      await api("POST", "/api/login", { token: $("token").value.trim() });
      $("token").value = "";
      if (await whoAmI()) onLoggedIn();
    } catch (error) {
      $("login-error").textContent = error.status === 401 ? "Unknown token." : error.message;
    }
  });
  $("logout").addEventListener("click", async () => {
    try {
      await api("POST", "/api/logout");
    } finally {
      window.location.reload();
    }
  });
}

// ---- the annotation page

async function showProjects() {
  $("task").hidden = true;
  $("projects").hidden = false;
  state.offer = null;
  const list = $("project-list");
  list.replaceChildren();
  const projects = await api("GET", "/api/projects");
  if (!projects.length) list.append(el("li", { text: "No projects yet." }));
  for (const project of projects) {
    const p = project.progress;
    const summary = `${p.labelled} labelled by you, ${p.open} open to you, ${p.items} items`;
    list.append(
      el(
        "li",
        { class: "project" },
        el("span", { class: "project-title", text: project.name }),
        el("span", { class: "project-mode", text: project.mode === "pair" ? "A / B" : "rank" }),
        el("span", { class: "project-progress", text: summary }),
        el("button", {
          type: "button",
          class: "primary",
          "data-project": String(project.id),
          text: "Label",
          onclick: () => nextItem(project.id),
        }),
      ),
    );
  }
}

async function nextItem(projectId) {
  const offer = await api("POST", `/api/projects/${projectId}/lease`);
  $("projects").hidden = true;
  $("task").hidden = false;
  render(offer);
}

function progressText(progress) {
  return `${progress.labelled} of ${progress.items} items done by you`;
}

function render(offer) {
  state.offer = offer;
  state.order = [];
  state.choice = null;
  state.flags = {};
  $("project-name").textContent = offer.project.name;
  $("progress").textContent = progressText(offer.progress);
  const done = offer.lease === null;
  $("done").hidden = !done;
  $("item").hidden = done;
  if (done) return;
  const pair = offer.project.mode === "pair";
  const k = offer.item.responses.length;
  $("instructions").textContent = pair
    ? "Which response is better? Click A or B (or press a, b, t for a tie)."
    : `Click the responses from best to worst, or press their numbers 1 to ${k}.`;
  renderPrompt(offer.item.prompt);
  const list = $("responses");
  list.replaceChildren();
  offer.item.responses.forEach((response, position) => {
    const name = pair ? "AB"[position] : String(position + 1);
    const flagButtons = FLAGS.map(([flag, label]) =>
      el("button", {
        type: "button",
        class: "flag",
        "aria-pressed": "false",
        "data-flag": flag,
        text: label,
        onclick: (event) => {
          event.stopPropagation();
          toggleFlag(position, flag, event.currentTarget);
        },
      }),
    );
    list.append(
      el(
        "li",
        {
          class: "response",
          "data-position": String(position),
          "data-index": String(response.index),
          onclick: () => (pair ? choose(position === 0 ? "A" : "B") : toggleRank(position)),
        },
        el(
          "div",
          { class: "response-head" },
          el("span", { class: "response-name", text: (pair ? "" : "Response ") + name }),
          el("span", { class: "rank", text: "" }),
          el("span", { class: "flags" }, ...flagButtons),
        ),
        el("div", { class: "text", text: response.text }),
      ),
    );
  });
  $("pair-choices").hidden = !pair;
  $("rationale").value = "";
  // A button still focused from the last item would take Enter as its own click.
  if (document.activeElement && document.activeElement !== document.body) {
    document.activeElement.blur();
  }
  update();
  window.scrollTo(0, 0);
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  if (typeof prompt === "string") {
    box.append(el("div", { class: "text", text: prompt }));
    return;
  }
  for (const message of prompt) {
    box.append(
      el(
        "div",
        { class: "message" },
        el("span", { class: "role", text: message.role }),
        el("div", { class: "text", text: message.content }),
      ),
    );
  }
}

function toggleRank(position) {
  const at = state.order.indexOf(position);
  if (at >= 0) state.order.splice(at, 1);
  else state.order.push(position);
  update();
}

function choose(choice) {
  state.choice = state.choice === choice ? null : choice;
  update();
}

function toggleFlag(position, flag, button) {
  const flags = state.flags[position] || (state.flags[position] = new Set());
  if (flags.has(flag)) flags.delete(flag);
  else flags.add(flag);
  button.setAttribute("aria-pressed", String(flags.has(flag)));
}

function ready() {
  if (!state.offer || !state.offer.lease) return false;
  if (state.offer.project.mode === "pair") return state.choice !== null;
  return state.order.length >= state.offer.item.responses.length - 1;
}

function update() {
  const pair = state.offer.project.mode === "pair";
  for (const card of $("responses").children) {
    const position = Number(card.dataset.position);
    const rank = state.order.indexOf(position);
    const picked = pair
      ? (state.choice === "A" && position === 0) || (state.choice === "B" && position === 1)
      : rank >= 0;
    card.classList.toggle("picked", picked);
    card.querySelector(".rank").textContent = pair
      ? picked ? "better" : ""
      : rank >= 0 ? `#${rank + 1}` : "";
  }
  for (const button of $("pair-choices").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.choice === state.choice));
  }
  $("submit").disabled = !ready() || state.busy;
}

function answer() {
  const shown = state.offer.item.responses;
  const flags = {};
  for (const [position, names] of Object.entries(state.flags)) {
    for (const name of names) (flags[name] = flags[name] || []).push(shown[position].index);
  }
  const body = { rationale: $("rationale").value, flags };
  if (state.offer.project.mode === "pair") {
    if (state.choice === "tie") body.tie = true;
    else {
      const [a, b] = [shown[0].index, shown[1].index];
      body.ranking = state.choice === "A" ? [a, b] : [b, a];
    }
    return body;
  }
  const order = state.order.slice();
  shown.forEach((_, position) => {
    if (!order.includes(position)) order.push(position); // the one left is the worst
  });
  body.ranking = order.map((position) => shown[position].index);
  return body;
}

async function submit() {
  if (!ready() || state.busy) return;
  state.busy = true;
  update();
  const projectId = state.offer.project.id;
  try {
    const saved = await api("POST", `/api/leases/${state.offer.lease.id}/label`, answer());
    say(saved.stored ? "Saved." : "Saved already (from another tab?): that answer stands.");
  } catch (error) {
    if (error.status === 409) say("That item was reassigned after its lease ran out: here is another.", true);
    else {
      say(error.message, true);
      state.busy = false;
      update();
      return;
    }
  }
  state.busy = false;
  await nextItem(projectId);
}

function onKey(event) {
  if (!state.offer || !state.offer.lease || $("task").hidden) return;
  const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(event.target.tagName);
  if (typing) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
    } else if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const pair = state.offer.project.mode === "pair";
  const k = state.offer.item.responses.length;
  const key = event.key.toLowerCase();
  if (!pair && /^[1-9]$/.test(key) && Number(key) <= k) toggleRank(Number(key) - 1);
  else if (pair && key === "a") choose("A");
  else if (pair && key === "b") choose("B");
  else if (pair && key === "t") choose("tie");
  else if (key === "enter") submit();
  else if (key === "backspace") {
    if (pair) state.choice = null;
    else state.order.pop();
    update();
  } else return;
  event.preventDefault();
}

function setUpAnnotate() {
  setUpLogin(showProjects);
  $("back").addEventListener("click", () => showProjects());
  $("submit").addEventListener("click", () => submit());
  $("clear").addEventListener("click", () => {
    state.order = [];
    state.choice = null;
    update();
  });
  for (const button of $("pair-choices").querySelectorAll("button")) {
    button.addEventListener("click", () => choose(button.dataset.choice));
  }
  document.addEventListener("keydown", onKey);
  whoAmI().then((ok) => ok && showProjects());
}

// ---- the admin page

function number(value) {
  return value === null || value === undefined ? "n/a" : value.toFixed(3);
}

async function showAdmin() {
  if (!state.me.admin) {
    say("This page is for admins; your token is an annotator's.", true);
    return;
  }
  $("admin").hidden = false;
  await Promise.all([loadProjects(), loadAnnotators()]);
}

async function loadProjects() {
  const projects = await api("GET", "/api/admin/projects");
  const all = await Promise.all(
    projects.map((project) => api("GET", `/api/admin/projects/${project.id}/stats`)),
  );
  const body = $("project-table").querySelector("tbody");
  body.replaceChildren();
  for (const [i, project] of projects.entries()) {
    const stats = all[i];
    const base = `/api/admin/projects/${project.id}/export`;
    body.append(
      el(
        "tr",
        { "data-project": String(project.id) },
        el(
          "td",
          {},
          el("button", {
            type: "button",
            class: "link",
            text: project.name,
            onclick: () => showAgreement(stats),
          }),
        ),
        el("td", { text: project.mode }),
        el("td", { text: String(project.labels_per_item) }),
        el("td", { text: String(project.items) }),
        el("td", { text: String(project.labels) }),
        el("td", { text: String(project.complete_items) }),
        el("td", { class: "alpha", text: number(stats.agreement.alpha) }),
        el("td", { text: number(stats.agreement.pairwise_agreement) }),
        el(
          "td",
          {},
          el("a", { href: `${base}/rankings.jsonl`, download: "rankings.jsonl", text: "rankings" }),
          " ",
          el("a", { href: `${base}/pairs.jsonl`, download: "pairs.jsonl", text: "pairs" }),
        ),
      ),
    );
  }
}

function showAgreement(stats) {
  $("project-detail").hidden = false;
  $("detail-name").textContent =
    `${stats.name}: alpha ${number(stats.agreement.alpha)}, ` +
    `pairwise agreement ${number(stats.agreement.pairwise_agreement)}`;
  const body = $("annotator-agreement").querySelector("tbody");
  body.replaceChildren();
  for (const [name, row] of Object.entries(stats.agreement.annotators)) {
    body.append(
      el(
        "tr",
        {},
        el("td", { text: name }),
        el("td", { text: String(row.labels) }),
        el("td", { text: String(row.shared_items) }),
        el("td", { text: number(row.pairwise_agreement) }),
        el("td", { text: number(row.alpha_without) }),
      ),
    );
  }
}

async function loadAnnotators() {
  const people = await api("GET", "/api/admin/annotators");
  const body = $("annotator-table").querySelector("tbody");
  body.replaceChildren();
  for (const person of people) {
    const revoke = el("button", {
      type: "button",
      text: "revoke",
      onclick: async () => {
        if (!window.confirm(`Revoke ${person.name}'s token?`)) return;
        await api("POST", `/api/admin/annotators/${encodeURIComponent(person.name)}/revoke`);
        await loadAnnotators();
      },
    });
    body.append(
      el(
        "tr",
        {},
        el("td", { text: person.name }),
        el("td", { text: person.admin ? "yes" : "" }),
        el("td", { text: String(person.labels) }),
        el("td", {}, person.revoked ? "revoked" : revoke),
      ),
    );
  }
}

function setUpAdmin() {
  setUpLogin(showAdmin);
  $("annotator-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("annotator-error").textContent = "";
    try {
      const made = await api("POST", "/api/admin/annotators", {
        name: $("annotator-name").value.trim(),
        admin: $("annotator-admin").checked,
      });
      $("new-token-name").textContent = made.name;
      $("new-token-value").textContent = made.token;
      $("new-token").hidden = false;
      $("annotator-name").value = "";
      await loadAnnotators();
    } catch (error) {
      $("annotator-error").textContent = error.message;
    }
  });
  $("project-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("project-error").textContent = "";
    try {
      const file = $("project-file").files[0];
      const text = await file.text();
      const rows = file.name.endsWith(".json")
        ? JSON.parse(text)
        : text.split("\n").flatMap((line, i) => {
            if (!line.trim()) return [];
            try {
              return [JSON.parse(line)];
            } catch (_) {
              throw new Error(`${file.name}: row ${i + 1}: invalid JSON`);
            }
          });
      await api("POST", "/api/admin/projects", {
        name: $("project-name-input").value.trim(),
        mode: $("project-mode").value,
        labels_per_item: Number($("project-n").value),
        lease_seconds: Number($("project-lease").value),
        rows,
      });
      event.target.reset();
      await loadProjects();
    } catch (error) {
      $("project-error").textContent = error.message;
    }
  });
  whoAmI().then((ok) => ok && showAdmin());
}

if (document.body.dataset.page === "admin") setUpAdmin();
else setUpAnnotate();
