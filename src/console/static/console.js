// credbroker console: the one script, served from the binary (the CSP
// allows no other). Reading works without it; it only asks before a form
// marked data-confirm is posted. Bulk revocations confirm on a page of
// their own, which states the count, script or not.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form && form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
