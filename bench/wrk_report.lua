-- The request shape comes from the environment (so the agent token never sits in argv), and
-- done() prints one JSON line the harness parses: requests, latency percentiles, errors.
local token = os.getenv("AEGIS_BENCH_TOKEN")
local body_bytes = tonumber(os.getenv("AEGIS_BENCH_BODY_BYTES") or "0")

wrk.method = os.getenv("AEGIS_BENCH_METHOD") or "GET"
if token and token ~= "" then
  wrk.headers["X-Aegis-Agent"] = token
end
if body_bytes > 0 then
  -- Text shaped like an LLM request body: what body inspection scans in real use.
  local unit = '{"role":"user","content":"Summarise the quarterly report and list the three largest risks."},'
  wrk.body = string.sub(string.rep(unit, math.ceil(body_bytes / #unit)), 1, body_bytes)
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'AEGIS_BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.0f,"p90_us":%.0f,' ..
    '"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
