// credbroker console: the one script, served from the binary (the CSP
// allows no other). Everything works without it: it only asks in a dialog
// before a form marked data-confirm is posted, and marks the form
// confirmed so the broker skips its own confirmation page. Bulk
// revocations always confirm on a page that states the count.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form && form.getAttribute && form.getAttribute("data-confirm");
  if (!question) return;
  if (!window.confirm(question)) {
    event.preventDefault();
    return;
  }
  if (form.elements.confirmed) form.elements.confirmed.value = "yes";
});
