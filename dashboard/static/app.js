// pgdispatch console: the little that needs a script (every page works without it).
(function () {
  "use strict";
  // Parts marked data-refresh="SECONDS" reload themselves while the tab is visible.
  // The page is fetched again and only that part swapped in; it stops once the part no longer
  // asks for it (a test that has its answer).
  document.querySelectorAll("[data-refresh]").forEach(function (part) {
    var id = part.id;
    var seconds = parseFloat(part.getAttribute("data-refresh")) || 5;
    var url = part.getAttribute("data-url") || window.location.pathname + window.location.search;
    var timer = setInterval(function () {
      var now = document.getElementById(id);
      if (!now || !now.hasAttribute("data-refresh")) { clearInterval(timer); return; }
      if (document.visibilityState !== "visible" || !window.htmx) { return; }
      window.htmx.ajax("GET", url, { target: "#" + id, select: "#" + id, swap: "outerHTML" });
    }, seconds * 1000);
  });
  // "Select all" for the checkboxes of a list.
  document.querySelectorAll("input[data-select-all]").forEach(function (box) {
    box.addEventListener("change", function () {
      document.querySelectorAll("input[name='" + box.getAttribute("data-select-all") + "']").forEach(
        function (other) { other.checked = box.checked; });
    });
  });
  // A table of user mappings grows a row on demand.
  document.querySelectorAll("button[data-add-row]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var body = document.getElementById(button.getAttribute("data-add-row"));
      var last = body.querySelector("tr:last-child");
      var copy = last.cloneNode(true);
      copy.querySelectorAll("input").forEach(function (input) { input.value = ""; });
      body.appendChild(copy);
    });
  });
})();
