-- wrk script for bench/bench_api.py: single-comment POST /v1/score requests, each with the next
-- real comment from ESP_BENCH_BODIES (one JSON body per line), and, when ESP_BENCH_MEAN_GAP_MS is
-- set, a random exponential pause before each request (open-loop-like pacing for the latency run).
local bodies = {}
local next_body = 1
local mean_gap_ms = tonumber(os.getenv("ESP_BENCH_MEAN_GAP_MS") or "0") or 0

function init(args)
  local path = os.getenv("ESP_BENCH_BODIES")
  for line in io.lines(path) do
    bodies[#bodies + 1] = line
  end
  if #bodies == 0 then
    error("no request bodies in " .. tostring(path))
  end
  math.randomseed(os.time())
  next_body = math.random(#bodies)
end

function request()
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
end

function delay()
  if mean_gap_ms <= 0 then
    return 0
  end
  return math.floor(-mean_gap_ms * math.log(1 - math.random()))
end
