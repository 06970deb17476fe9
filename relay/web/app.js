// The Mail Settings page of epp-mail-relay.
//
// Talks only to the admin API of the server that served it. The page logs in
// once with the admin token and then holds a session cookie (HttpOnly, so this
// script never sees it) and a CSRF token, sent as X-CSRF-Token on every call that
// changes something. Secrets are never received: the API says only whether a
// password or client secret is set, and an empty secret field on Save keeps it.
// Text from the server is always put in with textContent, never as HTML.
"use strict";

(function () {
  const SECRET_FIELDS = ["password", "client_secret"];
  const BASIC_FIELDS = ["email_type", "hostname", "port", "username", "password",
    "encryption", "admin_email"];
  const OAUTH_FIELDS = ["hostname", "port", "username", "tenant_id", "client_id",
    "client_secret", "redirect_uri", "oauth_flow", "admin_email"];
  const OAUTH_DEFAULTS = { hostname: "smtp.office365.com", port: "587" };
  const AUTH_LABELS = { basic: "Basic", oauth: "OAuth" };
  const SNAPSHOT_LABELS = {
    auth_type: "E-mail Authentication Type",
    email_type: "E-mail Type",
    hostname: "Hostname",
    port: "SMTP Port",
    username: "Username",
    encryption: "Encryption Type",
    tenant_id: "Tenant ID",
    client_id: "Application (Client) ID",
    redirect_uri: "Redirect URI",
    oauth_flow: "Sign-in flow",
  };
  const SNAPSHOT_VALUES = {
    basic: "Basic", oauth: "OAuth 2.0", native: "Native", smtp: "SMTP",
    starttls: "STARTTLS", ssl: "SSL/TLS",
    authorization_code: "Authorization code", device_code: "Device code",
    client_credentials: "Client credentials",
  };
  const LOG_PAGE_SIZE = 25;
  const STATUS_INTERVAL_MS = 15000;

  let csrfToken = null;
  let status = null;
  let callbackUri = null;
  let logOffset = 0;
  let logRows = [];
  let statusTimer = null;

  const $ = (id) => document.getElementById(id);

  // -- talking to the API ---------------------------------------------------------

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (csrfToken) headers["X-CSRF-Token"] = csrfToken;
    const options = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (error) {
      return { status: 0, data: { message: "The relay cannot be reached." } };
    }
    let data = {};
    try {
      data = await response.json();
    } catch (error) {
      data = {};
    }
    if (response.status === 401 && path !== "/api/session") {
      showLogin("The session has ended; enter the admin token again.");
    }
    return { status: response.status, data };
  }

  // -- logging in -----------------------------------------------------------------

  function showLogin(text) {
    csrfToken = null;
    if (statusTimer) clearInterval(statusTimer);
    $("app").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-message").textContent = text || "";
    $("login-token").focus();
  }

  async function showApp() {
    $("login").hidden = true;
    // Shown only once filled in, so that nothing typed is overwritten.
    await loadSettings();
    await refreshStatus();
    $("app").hidden = false;
    $("logout").hidden = false;
    statusTimer = setInterval(refreshStatus, STATUS_INTERVAL_MS);
    $("auth_type").focus();
  }

  async function start() {
    const { status: code, data } = await api("GET", "/api/session");
    if (code === 200 && data.csrf_token) {
      csrfToken = data.csrf_token;
      await showApp();
    } else {
      showLogin("");
    }
  }

  async function logIn(event) {
    event.preventDefault();
    const input = $("login-token");
    const { status: code, data } = await api("POST", "/api/session", { token: input.value });
    input.value = "";
    if (code === 200 && data.csrf_token) {
      csrfToken = data.csrf_token;
      $("login-message").textContent = "";
      await showApp();
    } else {
      $("login-message").textContent = data.message || "The admin token is not valid.";
      input.focus();
    }
  }

  async function logOut() {
    await api("DELETE", "/api/session");
    showLogin("Logged out.");
  }

  // -- status and the authorization notice ----------------------------------------

  async function refreshStatus() {
    const { status: code, data } = await api("GET", "/api/status");
    if (code !== 200) return;
    status = data;
    let line = data.summary;
    if (data.sign_in && data.sign_in.signed_in && data.sign_in.mailbox) {
      line += "; signed in as " + data.sign_in.mailbox;
    }
    $("status-line").textContent = line;
    updateAuthorizationNotice();
  }

  function updateAuthorizationNotice() {
    const chosen = $("auth_type").value;
    const signedIn = status && status.auth_type === "oauth" && status.sign_in
      && status.sign_in.signed_in === true;
    $("auth-required").hidden = !(chosen === "oauth" && !signedIn);
  }

  // -- the Mail Settings form ------------------------------------------------------

  function showFieldSets() {
    const chosen = $("auth_type").value;
    for (const element of document.querySelectorAll("[data-auth]")) {
      element.hidden = element.dataset.auth !== chosen;
    }
    if (chosen === "oauth") {
      for (const [name, value] of Object.entries(OAUTH_DEFAULTS)) {
        if (!$(name).value.trim()) $(name).value = value;
      }
    }
    updateAuthorizationNotice();
  }

  async function loadSettings() {
    const { status: code, data } = await api("GET", "/api/settings");
    if (code !== 200) return;
    const settings = data.settings;
    callbackUri = data.callback_uri;
    for (const name of ["auth_type", "email_type", "hostname", "username",
      "encryption", "admin_email", "tenant_id", "client_id", "redirect_uri",
      "oauth_flow"]) {
      $(name).value = settings[name] == null ? "" : String(settings[name]);
    }
    $("port").value = String(settings.port);
    for (const name of SECRET_FIELDS) {
      $(name).value = "";
      $(name).placeholder = settings[name + "_set"] ? "(unchanged)" : "";
      $("hint-" + name).textContent = settings[name + "_set"]
        ? "Set. Leave empty to keep it." : "Not set.";
    }
    $("hint-redirect_uri").textContent = "To finish Sign In on this server, register "
      + callbackUri + " in Azure and enter it here.";
    showFieldSets();
  }

  function clearFieldErrors() {
    for (const element of document.querySelectorAll("[aria-invalid]")) {
      element.removeAttribute("aria-invalid");
    }
    for (const element of document.querySelectorAll(".field-error")) {
      element.textContent = "";
    }
  }

  function showMessage(text, kind, detail) {
    const message = $("message");
    message.textContent = text || "";
    message.className = "message " + (kind || "");
    $("message-detail").textContent = detail || "";
  }

  function collectSettings() {
    const chosen = $("auth_type").value;
    const payload = { auth_type: chosen };
    const names = chosen === "oauth" ? OAUTH_FIELDS : BASIC_FIELDS;
    for (const name of names) {
      const value = $(name).value;
      if (SECRET_FIELDS.includes(name)) {
        // Empty means "keep what is stored": the page never has it to send back.
        if (value !== "") payload[name] = value;
      } else if (name === "port") {
        const trimmed = value.trim();
        // A port that is not a number goes as typed, for the server to name.
        payload.port = /^[0-9]{1,5}$/.test(trimmed) ? Number(trimmed) : trimmed;
      } else {
        payload[name] = value;
      }
    }
    if (chosen === "oauth") {
      payload.email_type = "smtp";
      payload.encryption = "starttls";
    }
    return payload;
  }

  async function save(event) {
    event.preventDefault();
    clearFieldErrors();
    showMessage("Saving...", "");
    const { status: code, data } = await api("POST", "/api/settings", collectSettings());
    if (code === 200) {
      showMessage(data.message, "ok");
      await loadSettings();
      await refreshStatus();
      return;
    }
    showMessage(data.message, "error", data.field ? data.field + ": " + data.reason
      : data.reason);
    const field = data.field && $(data.field);
    if (field) {
      field.setAttribute("aria-invalid", "true");
      const error = $("error-" + data.field);
      if (error) error.textContent = data.reason || "";
      field.focus();
    }
  }

  async function sendTestEmail() {
    showMessage("Sending the test e-mail...", "");
    const { status: code, data } = await api("POST", "/api/test-email");
    showMessage(data.message, code === 200 ? "ok" : "error", data.reason);
    await refreshStatus();
  }

  // -- Sign In ---------------------------------------------------------------------

  async function signIn() {
    showMessage("Starting Sign In...", "");
    const panel = $("sign-in-panel");
    const { status: code, data } = await api("POST", "/api/signin");
    if (code !== 200) {
      showMessage(data.message, "error", data.reason);
      return;
    }
    if (data.flow === "authorization_code") {
      if (callbackUri && $("redirect_uri").value.trim() === callbackUri) {
        // Microsoft sends the browser back to this server's /oauth/callback.
        window.location.assign(data.authorization_url);
        return;
      }
      panel.hidden = false;
      $("sign-in-prompt").textContent = "Sign in on Microsoft's page. Your browser is "
        + "then sent to the Redirect URI; paste that whole address here.";
      $("sign-in-link").href = data.authorization_url;
      $("sign-in-link-line").hidden = false;
      $("complete-form").hidden = false;
      showMessage("", "");
      $("sign-in-link").focus();
      return;
    }
    if (data.flow === "device_code") {
      panel.hidden = false;
      $("sign-in-prompt").textContent = data.prompt || "";
      $("sign-in-link-line").hidden = true;
      $("complete-form").hidden = true;
      showMessage("Waiting for the sign-in to be approved...", "");
      pollSignIn();
      return;
    }
    showMessage(data.message, data.state === "complete" ? "ok" : "error", data.reason);
    await refreshStatus();
  }

  async function pollSignIn() {
    const { status: code, data } = await api("GET", "/api/signin");
    if (code === 200 && data.state === "pending") {
      setTimeout(pollSignIn, 2000);
      return;
    }
    $("sign-in-panel").hidden = true;
    showMessage(data.message, data.state === "complete" ? "ok" : "error", data.reason);
    await refreshStatus();
  }

  async function completeSignIn(event) {
    event.preventDefault();
    const input = $("redirect_url");
    const { status: code, data } = await api("POST", "/api/signin/complete",
      { redirect_url: input.value });
    input.value = "";
    if (code === 200) $("sign-in-panel").hidden = true;
    showMessage(data.message, code === 200 ? "ok" : "error", data.reason);
    await refreshStatus();
  }

  // -- tabs ------------------------------------------------------------------------

  function selectTab(tab, focus) {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      $(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
    if (tab.id === "tab-logs") loadLogs();
  }

  function onTabKey(event) {
    const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
    const index = tabs.indexOf(event.currentTarget);
    let next = null;
    if (event.key === "ArrowRight") next = tabs[(index + 1) % tabs.length];
    if (event.key === "ArrowLeft") next = tabs[(index - 1 + tabs.length) % tabs.length];
    if (event.key === "Home") next = tabs[0];
    if (event.key === "End") next = tabs[tabs.length - 1];
    if (next) {
      event.preventDefault();
      selectTab(next, true);
    }
  }

  // -- Mail Server Logs ------------------------------------------------------------

  function isoFromLocal(value) {
    if (!value) return "";
    const moment = new Date(value);
    return isNaN(moment.getTime()) ? "" : moment.toISOString();
  }

  async function loadLogs() {
    const query = new URLSearchParams({ limit: String(LOG_PAGE_SIZE),
      offset: String(logOffset) });
    const category = $("log-category").value;
    const since = isoFromLocal($("log-since").value);
    const until = isoFromLocal($("log-until").value);
    if (category) query.set("category", category);
    if (since) query.set("since", since);
    if (until) query.set("until", until);
    const { status: code, data } = await api("GET", "/api/logs?" + query.toString());
    if (code !== 200) {
      showLogsError(data);
      return;
    }
    logRows = data.rows;
    renderLogs();
    $("logs-previous").disabled = logOffset === 0;
    $("logs-next").disabled = !data.has_more;
  }

  function showLogsError(data) {
    const body = $("logs-body");
    body.replaceChildren();
    $("logs-empty").hidden = false;
    $("logs-empty").textContent = (data.message || "") + " " + (data.reason || "");
  }

  function renderLogs() {
    const body = $("logs-body");
    body.replaceChildren();
    logRows.forEach((row, index) => {
      const tr = document.createElement("tr");
      tr.tabIndex = 0;
      tr.dataset.index = String(index);
      tr.setAttribute("aria-selected", "false");
      tr.title = "Enter or click: show the Mail Settings of this row";
      const repeat = row.repeat_count > 1 ? " (x" + row.repeat_count + ")" : "";
      const cells = [
        [AUTH_LABELS[row.auth_type] || row.auth_type, ""],
        [row.status, "status-" + row.status],
        [row.log_message + repeat, ""],
        [row.registered_at, "when"],
      ];
      for (const [text, className] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (className) td.className = className;
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => showSnapshot(tr));
      tr.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          showSnapshot(tr);
        }
      });
      body.appendChild(tr);
    });
    $("logs-empty").textContent = "No rows.";
    $("logs-empty").hidden = logRows.length > 0;
    $("snapshot").hidden = true;
  }

  function showSnapshot(tr) {
    const row = logRows[Number(tr.dataset.index)];
    for (const other of $("logs-body").children) {
      other.setAttribute("aria-selected", String(other === tr));
    }
    const list = $("snapshot-list");
    list.replaceChildren();
    const snapshot = row.settings_snapshot || {};
    const entries = Object.keys(SNAPSHOT_LABELS)
      .filter((key) => key in snapshot)
      .map((key) => [SNAPSHOT_LABELS[key], SNAPSHOT_VALUES[snapshot[key]] || snapshot[key]]);
    if (row.category) entries.push(["Category", row.category]);
    if (row.code) entries.push(["Code", row.code]);
    if (row.queue_id) entries.push(["Queue ID", row.queue_id]);
    if (row.recipient) entries.push(["Recipient", row.recipient]);
    if (row.repeat_count > 1) {
      entries.push(["Repeated", row.repeat_count + " times, last at " + row.last_seen_at]);
    }
    for (const [label, value] of entries) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = value == null ? "" : String(value);
      list.append(dt, dd);
    }
    const panel = $("snapshot");
    panel.hidden = false;
    panel.dataset.row = tr.dataset.index;
    panel.focus();
  }

  function closeSnapshot() {
    const panel = $("snapshot");
    panel.hidden = true;
    const row = $("logs-body").querySelector('[data-index="' + panel.dataset.row + '"]');
    if (row) row.focus();
  }

  // -- wiring ----------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", logIn);
    $("logout").addEventListener("click", logOut);
    $("auth_type").addEventListener("change", showFieldSets);
    $("settings-form").addEventListener("submit", save);
    $("sign-in").addEventListener("click", signIn);
    $("test-email").addEventListener("click", sendTestEmail);
    $("complete-form").addEventListener("submit", completeSignIn);
    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener("click", () => selectTab(tab, false));
      tab.addEventListener("keydown", onTabKey);
    }
    $("logs-filter").addEventListener("submit", (event) => {
      event.preventDefault();
      logOffset = 0;
      loadLogs();
    });
    $("logs-previous").addEventListener("click", () => {
      logOffset = Math.max(0, logOffset - LOG_PAGE_SIZE);
      loadLogs();
    });
    $("logs-next").addEventListener("click", () => {
      logOffset += LOG_PAGE_SIZE;
      loadLogs();
    });
    $("snapshot-close").addEventListener("click", closeSnapshot);
    start();
  });
})();
