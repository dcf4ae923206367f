-- wrk script for bench/pipeline_throughput.py: every request a new Idempotency-Key and order id.
-- usage: wrk -s bench/wrk_payments.lua URL -- {payroute|hop} API_KEY NONCE
local counter = 0
local threads = 0
local card = '{"number":"4242424242424242","exp_month":12,"exp_year":2034,"cvc":"123"}'

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  mode = args[1] or "payroute"
  api_key = args[2] or ""
  nonce = args[3] or tostring(os.time())
end

function request()
  counter = counter + 1
  local id = nonce .. "-" .. tid .. "-" .. counter
  local headers = {["Content-Type"] = "application/json", ["Idempotency-Key"] = "k-" .. id}
  local body
  if mode == "hop" then
    body = '{"amount":1099,"currency":"USD","capture":true,"reference":"r-' .. id .. '","card":' .. card .. '}'
  else
    headers["Authorization"] = "Bearer " .. api_key
    body = '{"amount":1099,"currency":"USD","country":"US","merchant_order_id":"o-' .. id ..
      '","payment_method":{"type":"card","card":' .. card .. '}}'
  end
  return wrk.format("POST", nil, headers, body)
end
