// Live parts of the pages: each element with data-events="URL" is
// replaced by what the server sends on that event stream; a <pre> with
// data-log="URL" grows with the log it streams. No other code, no
// outside requests.
document.querySelectorAll("[data-events]").forEach(function (el) {
  var source = new EventSource(el.getAttribute("data-events"));
  source.addEventListener("update", function (e) { el.innerHTML = e.data; });
});
document.querySelectorAll("pre[data-log]").forEach(function (el) {
  var source = new EventSource(el.getAttribute("data-log"));
  source.addEventListener("log", function (e) {
    var bottom = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
    el.textContent += JSON.parse(e.data);
    if (bottom) { el.scrollTop = el.scrollHeight; }
  });
  source.addEventListener("end", function (e) {
    source.close();
    var done = document.getElementById("log-state");
    if (done) { done.textContent = e.data; }
  });
});
