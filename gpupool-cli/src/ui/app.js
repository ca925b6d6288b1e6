// Live parts of the pages: each element with data-events="URL" is
// replaced by what the server sends on that event stream; a <pre> with
// data-log="URL" grows with the log it streams; a sweep's page plots its
// metric against each swept argument (uPlot, served by gpupool itself).
// No outside requests.
var sources = [];
// A page's streams close as it goes (a browser holds at most six
// connections to one host; a page kept for "back" must not hold them).
window.addEventListener("pagehide", function () { sources.forEach(function (s) { s.close(); }); });
document.querySelectorAll("[data-events]").forEach(function (el) {
  var source = new EventSource(el.getAttribute("data-events"));
  sources.push(source);
  source.addEventListener("update", function (e) { if (e.data) { el.innerHTML = e.data; } });
});
document.querySelectorAll("pre[data-log]").forEach(function (el) {
  var source = new EventSource(el.getAttribute("data-log"));
  sources.push(source);
  source.addEventListener("status", function (e) {
    var status = document.getElementById("status");
    if (status) { status.innerHTML = e.data; }
  });
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

(function () {
  var data = document.getElementById("sweep-data");
  var charts = document.getElementById("charts");
  if (!data || !charts || typeof uPlot === "undefined") { return; }
  var sweep = JSON.parse(data.textContent);
  Object.keys(sweep.params).forEach(function (name) {
    var points = sweep.params[name];
    var box = document.createElement("div");
    box.className = "chart";
    charts.appendChild(box);
    new uPlot({
      title: sweep.metric + " against " + name,
      width: 420, height: 260,
      scales: { x: { time: false } },
      axes: [{ label: name }, { label: sweep.metric }],
      series: [{ label: name }, { label: sweep.metric, stroke: "#0969da", points: { show: true, size: 8 }, paths: function () { return null; } }]
    }, [points.map(function (p) { return p[0]; }), points.map(function (p) { return p[1]; })], box);
  });
})();
