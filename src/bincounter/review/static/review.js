// The review page: a person counts the bins of the review queue, one photo at a time, as fast as
// they can. Plain JS, no build step, no network but this server (api/..., relative, so the page
// works behind a path prefix). It never shows the model's count nor the inventory's: the API
// does not send them, and the page asks for nothing else.
"use strict";
(function () {
  const TOKEN_KEY = "bincounter.review.token";
  const MAX_DIGITS = 4;
  const SHA256 = /^[0-9a-f]{64}$/;
  const $ = (id) => document.getElementById(id);
  const signin = $("signin"), tokenInput = $("token"), signinButton = $("signin-button");
  const who = $("who"), reviewerOut = $("reviewer"), signoutButton = $("signout");
  const errorOut = $("error"), retryButton = $("retry"), loadingOut = $("loading");
  const work = $("work"), photo = $("photo"), binIdOut = $("bin-id"), progressOut = $("progress");
  const countOut = $("count"), notice = $("notice"), done = $("done"), doneCount = $("done-count");
  const saveButton = $("save"), skipButton = $("skip"), cantButton = $("cant-tell"), deleteButton = $("delete");
  const digitButtons = Array.from(document.querySelectorAll("button[data-digit]"));
  const padButtons = new Set(digitButtons.concat([deleteButton, saveButton]));

  let token = readToken();
  let me = null;        // {reviewer, answered, remaining, sign_in}
  let bin = null;       // {id, sha256}: the bin on screen; sha256 once its photo is shown
  let remaining = null; // left in the queue, as api/next last said
  let typed = "";
  let busy = false;     // a request is in flight: every answer button is disabled
  let photoUrl = null;
  let retry = null;     // what "Try again" runs after a failure
  let session = 0;      // bumped on sign-out: answers to an older session's requests are dropped

  function readToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || null; } catch (e) { return null; }
  }

  function storeToken(value) {
    token = value || null;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage off: the token lives as long as the page */ }
  }

  // -- the server ---------------------------------------------------------------------------

  function api(path, options) {
    const opts = Object.assign({ cache: "no-store", credentials: "same-origin" }, options || {});
    const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    if (token) headers.Authorization = "Bearer " + token;
    opts.headers = headers;
    return fetch("api/" + path, opts);
  }

  async function readJson(response) {
    try { return await response.json(); } catch (e) { return null; }
  }

  function detailOf(response, data) {
    const d = data && data.detail;
    if (typeof d === "string" && d) return d;
    if (d) return JSON.stringify(d);
    return response.statusText || "no reason given";
  }

  function binPath(id, what) {
    return "bins/" + encodeURIComponent(id) + "/" + what;
  }

  // -- what is on screen --------------------------------------------------------------------

  function showError(message, again) {
    errorOut.textContent = message;
    errorOut.hidden = false;
    retry = again || null;
    retryButton.hidden = !retry;
  }

  function clearError() {
    errorOut.hidden = true;
    errorOut.textContent = "";
    retry = null;
    retryButton.hidden = true;
  }

  function say(message) {
    notice.textContent = message || "";
  }

  function setBusy(value) {
    busy = value;
    work.setAttribute("aria-busy", value ? "true" : "false");
    const ready = !value && bin !== null;
    const shown = ready && bin.sha256 !== null;
    digitButtons.forEach((b) => { b.disabled = !ready; });
    deleteButton.disabled = !ready;
    saveButton.disabled = !shown;
    cantButton.disabled = !shown;
    skipButton.disabled = !ready;
    retryButton.disabled = value;
    signinButton.disabled = value;
  }

  function showCount() {
    countOut.textContent = typed;
    countOut.value = typed;
  }

  function showProgress() {
    const answered = me && typeof me.answered === "number" ? me.answered : 0;
    const left = typeof remaining === "number" ? remaining : "?";
    progressOut.textContent = "You counted " + answered + " · " + left + " left in the queue";
  }

  function dropPhoto() {
    photo.hidden = true;
    photo.removeAttribute("src");
    photo.alt = "";
    if (photoUrl) { URL.revokeObjectURL(photoUrl); photoUrl = null; }
  }

  function showSignin(message) {
    session++;
    me = null;
    bin = null;
    typed = "";
    showCount();
    dropPhoto();
    work.hidden = true;
    done.hidden = true;
    who.hidden = true;
    loadingOut.hidden = true;
    signin.hidden = false;
    setBusy(false);
    if (message) showError(message); else clearError();
    tokenInput.value = "";
    tokenInput.focus();
  }

  function showSignedIn() {
    reviewerOut.textContent = me.reviewer;
    // Behind an authenticating proxy the proxy signs people out, not this page.
    signoutButton.hidden = me.sign_in === "proxy";
    who.hidden = false;
    signin.hidden = true;
  }

  // A 401 in the middle of the work: the token was revoked, or the proxy's session ended.
  function signedOut() {
    storeToken(null);
    showSignin("You were signed out (the server refused your token). Sign in again.");
  }

  // -- signing in -----------------------------------------------------------------------------

  async function checkMe(fromForm) {
    const mine = session;
    clearError();
    setBusy(true);
    loadingOut.hidden = false;
    let response, data;
    try {
      response = await api("me");
      data = await readJson(response);
    } catch (e) {
      if (mine !== session) return;
      loadingOut.hidden = true;
      setBusy(false);
      showError("The server could not be reached (" + e.message + ").", () => checkMe(fromForm));
      return;
    }
    if (mine !== session) return;
    loadingOut.hidden = true;
    setBusy(false);
    if (response.status === 401) {
      const refused = token !== null;
      storeToken(null);
      showSignin(refused ? (fromForm ? "That token was refused. Check it and try again."
                                     : "That token was refused (it may have been withdrawn). Sign in again.") : "");
      return;
    }
    if (!response.ok || !data || typeof data.reviewer !== "string") {
      showError("The server could not say who you are (" + response.status + ": " + detailOf(response, data) + ").",
                () => checkMe(fromForm));
      return;
    }
    me = data;
    showSignedIn();
    loadNext();
  }

  signin.addEventListener("submit", (e) => {
    e.preventDefault();
    if (busy) return;
    const value = tokenInput.value.trim();
    if (!value) { showError("Type your reviewer token first."); tokenInput.focus(); return; }
    storeToken(value);
    tokenInput.value = "";
    checkMe(true);
  });

  signoutButton.addEventListener("click", () => {
    storeToken(null);
    showSignin("");
  });

  retryButton.addEventListener("click", () => {
    if (busy || !retry) return;
    const again = retry;
    clearError();
    again();
  });

  // -- the next bin -------------------------------------------------------------------------------

  async function loadNext() {
    const mine = session;
    bin = null;
    typed = "";
    showCount();
    work.classList.add("loading");
    setBusy(true);
    let response, data;
    try {
      response = await api("next");
      data = await readJson(response);
    } catch (e) {
      if (mine !== session) return;
      setBusy(false);
      showError("The next bin could not be fetched: the server could not be reached (" + e.message + ").", loadNext);
      return;
    }
    if (mine !== session) return;
    if (response.status === 401) { signedOut(); return; }
    if (!response.ok || !data) {
      setBusy(false);
      showError("The next bin could not be fetched (" + response.status + ": " + detailOf(response, data) + ").",
                loadNext);
      return;
    }
    if (typeof data.remaining === "number") remaining = data.remaining;
    if (data.id === null || data.id === undefined) { finish(); return; }
    bin = { id: String(data.id), sha256: null };
    binIdOut.textContent = bin.id;
    done.hidden = true;
    work.hidden = false;
    showProgress();
    await loadPhoto();
  }

  async function loadPhoto() {
    const mine = session, current = bin;
    if (!current) return;
    work.classList.add("loading");
    setBusy(true);
    let response, data = null, blob = null;
    try {
      response = await api(binPath(current.id, "photo"), { headers: { Accept: "image/*" } });
      if (response.ok) blob = await response.blob(); else data = await readJson(response);
    } catch (e) {
      if (mine !== session || current !== bin) return;
      setBusy(false);
      showError("The photo of bin " + current.id + " could not be fetched: the server could not be reached (" +
                e.message + "). Try again, or skip the bin.", loadPhoto);
      return;
    }
    if (mine !== session || current !== bin) return;
    if (response.status === 401) { signedOut(); return; }
    const sha256 = (response.headers.get("X-Photo-Sha256") || "").trim().toLowerCase();
    if (!response.ok || !SHA256.test(sha256)) {
      setBusy(false);
      const why = response.ok ? "the server did not say which photo it is" : response.status + ": " + detailOf(response, data);
      showError("The photo of bin " + current.id + " could not be loaded (" + why + "). Try again, or skip the bin.",
                loadPhoto);
      return;
    }
    const url = URL.createObjectURL(blob);
    photo.src = url;
    photo.alt = "Bin " + current.id;
    try {
      await photo.decode();
    } catch (e) {
      if (mine !== session || current !== bin) { URL.revokeObjectURL(url); return; }
      URL.revokeObjectURL(url);
      photo.removeAttribute("src");
      setBusy(false);
      showError("The photo of bin " + current.id + " could not be shown (it is not an image this browser reads). " +
                "Skip the bin.", null);
      return;
    }
    if (mine !== session || current !== bin) { URL.revokeObjectURL(url); return; }
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = url;
    photo.hidden = false;
    current.sha256 = sha256;
    work.classList.remove("loading");
    // A button clicked for the last bin (Skip, Can't tell) must not take the next Enter.
    const active = document.activeElement;
    if (active && work.contains(active) && !padButtons.has(active) && active.blur) active.blur();
    setBusy(false);
  }

  function finish() {
    bin = null;
    dropPhoto();
    work.hidden = true;
    work.classList.remove("loading");
    const answered = me && typeof me.answered === "number" ? me.answered : 0;
    doneCount.textContent = "You counted " + answered + (answered === 1 ? " bin." : " bins.");
    done.hidden = false;
    setBusy(false);
  }

  // -- answers --------------------------------------------------------------------------------------

  async function send(what, body, onStored) {
    const mine = session, current = bin;
    if (busy || !current) return;
    if (what === "answer" && !current.sha256) return;
    setBusy(true);
    let response, data;
    try {
      const options = { method: "POST" };
      if (body) {
        options.headers = { "Content-Type": "application/json" };
        options.body = JSON.stringify(body);
      }
      response = await api(binPath(current.id, what), options);
      data = await readJson(response);
    } catch (e) {
      if (mine !== session) return;
      setBusy(false);
      showError("Not saved: the server could not be reached (" + e.message + "). Your answer is kept: try again.");
      return;
    }
    if (mine !== session || current !== bin) return;
    if (response.status === 401) { signedOut(); return; }
    if (response.status === 409) {
      // The photo changed, or the bin went to someone else: nothing to retry, take the next one.
      clearError();
      say("Not saved: " + detailOf(response, data) + " Here is the next bin.");
      loadNext();
      return;
    }
    if (!response.ok || !data) {
      setBusy(false);
      const detail = response.status + ": " + detailOf(response, data);
      if (response.status === 422) showError("That answer was refused (" + detail + ").");
      else showError("Not saved (" + detail + "). Your answer is kept: try again.");
      return;
    }
    clearError();
    onStored(data);
    loadNext();
  }

  function save() {
    if (busy || !bin || !bin.sha256) return;
    if (typed === "") { say("Type the count first (the number pad, or the keys 0–9)."); return; }
    const count = Number(typed), id = bin.id;
    send("answer", { count: count, photo_sha256: bin.sha256 }, (data) => {
      if (me && typeof data.answered === "number") me.answered = data.answered;
      say("Saved " + count + " for bin " + id + ".");
    });
  }

  function cantTell() {
    if (busy || !bin || !bin.sha256) return;
    const id = bin.id;
    send("answer", { cant_tell: true, photo_sha256: bin.sha256 }, (data) => {
      if (me && typeof data.answered === "number") me.answered = data.answered;
      say("Saved \u201ccan't tell\u201d for bin " + id + ".");
    });
  }

  function skip() {
    if (busy || !bin) return;
    const id = bin.id;
    send("skip", null, () => { say("Skipped bin " + id + "."); });
  }

  function typeDigit(d) {
    if (busy || !bin) return;
    if (typed === "0") typed = "";  // no leading zeros: "07" is 7
    if (typed.length >= MAX_DIGITS) { say("A count has at most " + MAX_DIGITS + " digits."); return; }
    typed += d;
    say("");
    showCount();
  }

  function deleteDigit() {
    if (busy || !bin) return;
    typed = typed.slice(0, -1);
    say("");
    showCount();
  }

  digitButtons.forEach((b) => b.addEventListener("click", () => typeDigit(b.dataset.digit)));
  deleteButton.addEventListener("click", deleteDigit);
  saveButton.addEventListener("click", save);
  cantButton.addEventListener("click", cantTell);
  skipButton.addEventListener("click", skip);

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const target = e.target;
    if (target === tokenInput || (target instanceof Element && target.closest("input, textarea, select"))) return;
    if (work.hidden) return;
    const key = e.key;
    if (/^[0-9]$/.test(key)) { e.preventDefault(); typeDigit(key); return; }
    if (key === "Backspace") { e.preventDefault(); deleteDigit(); return; }
    if (key === "Enter") {
      // Enter on a focused button outside the pad (Skip, Can't tell, Sign out) presses that button.
      if (target instanceof HTMLButtonElement && !padButtons.has(target)) return;
      e.preventDefault();
      if (!e.repeat) save();
      return;
    }
    if (e.repeat) return;
    if (key === "s" || key === "S") { e.preventDefault(); skip(); return; }
    if (key === "c" || key === "C" || key === "?") { e.preventDefault(); cantTell(); }
  });

  // A photo the browser cannot draw after all.
  photo.addEventListener("error", () => { if (photo.getAttribute("src")) photo.hidden = true; });

  showProgress();
  setBusy(false);
  checkMe(false);
})();
