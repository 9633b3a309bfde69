// csbs console: local times, live progress of backups, and the bind counter. Every page
// works without this script; it only makes pages livelier.
(function () {
  "use strict";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      if (!iso) return;
      var when = new Date(iso);
      if (isNaN(when.getTime())) return;
      el.title = el.textContent;
      el.textContent = when.toLocaleString(document.documentElement.lang, {
        year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit"
      });
    });
  }

  function liveProgress() {
    var list = document.getElementById("backups");
    if (!list) return;
    var url = list.getAttribute("data-progress-url");
    function poll() {
      var rows = list.querySelectorAll("article[data-live]");
      if (!rows.length) return;
      var ids = Array.prototype.map.call(rows, function (r) { return r.getAttribute("data-id"); });
      fetch(url + "?ids=" + encodeURIComponent(ids.join(",")), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : {}; })
        .then(function (found) {
          var settled = false;
          rows.forEach(function (row) {
            var now = found[row.getAttribute("data-id")];
            if (!now) { settled = true; return; }  // deleted meanwhile
            var badge = row.querySelector("[data-role=status]");
            badge.textContent = now.label;
            badge.className = "badge " + now.status;
            row.setAttribute("data-status", now.status);
            var bar = row.querySelector("progress");
            if (bar) { bar.value = now.progress; bar.textContent = now.progress + "%"; }
            if (!now.live) { row.removeAttribute("data-live"); settled = true; }
          });
          // A backup that settled gets the actions of its new state: show the page again.
          if (settled) { window.location.reload(); return; }
          window.setTimeout(poll, 1500);
        })
        .catch(function () { window.setTimeout(poll, 5000); });
    }
    window.setTimeout(poll, 1000);
  }

  function bindCounter() {
    var counter = document.getElementById("bind-count");
    if (!counter) return;
    var boxes = document.querySelectorAll("input[data-bind]");
    function update() {
      var n = Array.prototype.filter.call(boxes, function (b) { return b.checked; }).length;
      counter.textContent = counter.getAttribute("data-template").replace("{count}", n);
      counter.classList.toggle("over", n > 64);
    }
    boxes.forEach(function (b) { b.addEventListener("change", update); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    liveProgress();
    bindCounter();
  });
})();
