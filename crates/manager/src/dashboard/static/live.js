// kvmha dashboard: keeps <main> current without a page reload. No dependencies.
// Skipped while the keyboard focus is inside <main> (a user is tabbing through it) or
// while the tab is hidden; without JavaScript a <noscript> refresh does the same.
(function () {
  "use strict";
  var every = 3000;
  function refresh() {
    var main = document.getElementById("main");
    if (!main || document.hidden || main.contains(document.activeElement) && document.activeElement !== main) {
      return;
    }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { return null; }
        return response.text();
      })
      .then(function (text) {
        if (!text) { return; }
        var next = new DOMParser().parseFromString(text, "text/html");
        var fresh = next.getElementById("main");
        if (fresh) { main.innerHTML = fresh.innerHTML; }
        var header = next.querySelector("header");
        var current = document.querySelector("header");
        if (header && current && !current.contains(document.activeElement)) { current.innerHTML = header.innerHTML; }
        document.documentElement.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the manager may be restarting: try again next time */ });
  }
  window.setInterval(refresh, every);
})();
