"use strict";
// The browser network test: one relay-only RTCPeerConnection pair per TURN URI.
const TIMEOUT_MS = 15000;

function transportOf(url) {
  if (url.startsWith("turns:")) return "tls";
  return /transport=tcp/.test(url) ? "tcp" : "udp";
}

// One AudioContext, made inside the Start click: browsers refuse audio without a gesture.
let audioContext = null;

function fakeAudioTrack() {
  const osc = audioContext.createOscillator();
  const dest = audioContext.createMediaStreamDestination();
  osc.connect(dest);
  osc.start();
  return { track: dest.stream.getAudioTracks()[0], stream: dest.stream, stop: () => osc.stop() };
}

// Call quality in Twilio's preflight words, as `turnserver preflight` computes it
// (turnserver/client/quality.py: the same E-model constants, grades and thresholds).
const R0 = 94.768;
const GRADES = [[4.2, "excellent"], [4.1, "great"], [3.7, "good"], [3.1, "fair"]];
const WORKS = "works", POOR = "works, but poor", FAILS = "does not work";

function mos(rttMs, jitterMs, loss) {
  const effective = rttMs + 2 * jitterMs + 10;
  let r = effective < 160 ? R0 - effective / 40 : effective < 1000 ? R0 - (effective - 120) / 10 : 0;
  const lostPercent = loss * 100;
  r = lostPercent <= r / 2.5 ? Math.max(r - lostPercent * 2.5, 6.52) : 0;
  return 1 + 0.035 * r + 0.000007 * r * (r - 60) * (100 - r);
}

function grade(score) {
  for (const [floor, name] of GRADES) if (score > floor) return name;
  return "degraded";
}

function warningsFor(rttMs, jitterMs, loss, score) {
  const out = [];
  if (rttMs > 400) out.push("high-rtt");
  if (jitterMs > 30) out.push("high-jitter");
  if (loss > 0.01) out.push("high-packet-loss");
  if (score < 3.5) out.push("low-mos");
  return out;
}

// Per round trip to the server, as the CLI reports it: the media between the two relay
// candidates crosses the path to the server twice each way (a -> server -> b): half the
// pair's round trip, the jitter of one crossing about 1/sqrt(2) of a -> b's, and the
// loss of one crossing 1 - sqrt(1 - p) for a loss p of a -> b.
function quality(rttLoopMs, jitterAbMs, lossAb) {
  const rtt = rttLoopMs / 2, jitter = jitterAbMs / Math.SQRT2;
  const loss = 1 - Math.sqrt(Math.max(0, 1 - lossAb));
  const score = mos(rtt, jitter, loss);
  const round = (x, n) => Math.round(x * 10 ** n) / 10 ** n;
  const warnings = warningsFor(rtt, jitter, loss, score);
  return { rttMs: round(rtt, 1), jitterMs: round(jitter, 1), loss: round(loss, 4),
           mos: round(score, 2), grade: grade(score), warnings,
           verdict: warnings.length ? POOR : WORKS };
}

function hintFor(result) {
  if (result.ok) return null;
  if (result.transport === "tls") {
    return "TLS (turns:) failed: if the other transports work, the browser most likely does " +
           "not trust the server's certificate (self-signed, expired, or not for this host " +
           "name). `turnserver preflight --ca FILE turns:HOST:PORT` prints the exact " +
           "certificate error.";
  }
  if (result.turnErrors.some((e) => e.startsWith("401"))) {
    return "the credential was refused (401): wrong shared secret, realm, or an expired credential";
  }
  if (result.turnErrors.some((e) => e.startsWith("701")) || /timed out|no relay candidate/.test(result.error || "")) {
    return `no relay over ${result.transport} within ${TIMEOUT_MS / 1000} s: the TURN server ` +
           `cannot be reached over ${result.transport} (a firewall blocks it) or is down`;
  }
  return null;
}

async function selectedPair(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
  });
  if (!pair) stats.forEach((s) => { if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s; });
  if (!pair) return null;
  const local = stats.get(pair.localCandidateId) || {};
  const remote = stats.get(pair.remoteCandidateId) || {};
  const audio = { packetsReceived: 0, packetsLost: 0, jitter: 0 };
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      audio.packetsReceived += s.packetsReceived || 0;
      audio.packetsLost += Math.max(0, s.packetsLost || 0);
      audio.jitter = Math.max(audio.jitter, s.jitter || 0);
    }
  });
  const avg = pair.responsesReceived ? pair.totalRoundTripTime / pair.responsesReceived : null;
  return {
    local: `${local.candidateType} ${local.protocol} ${local.address || local.ip}:${local.port}` +
           (local.relayProtocol ? ` (relay over ${local.relayProtocol})` : ""),
    remote: `${remote.candidateType} ${remote.protocol} ${remote.address || remote.ip}:${remote.port}`,
    localType: local.candidateType, remoteType: remote.candidateType,
    loopRttMs: avg != null ? avg * 1000 : (pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null),
    audio,
  };
}

async function testUri(url, username, credential) {
  const result = { url, transport: transportOf(url), connected: false, pair: null, rttMs: null,
                   quality: null, verdict: FAILS, audioPacketsReceived: 0, dataEcho: false,
                   turnErrors: [], error: null };
  const config = { iceServers: [{ urls: [url], username, credential }], iceTransportPolicy: "relay" };
  const a = new RTCPeerConnection(config);
  const b = new RTCPeerConnection(config);
  const audio = fakeAudioTrack();
  const onError = (e) => result.turnErrors.push(`${e.errorCode} ${e.errorText} (${e.url || url})`);
  a.addEventListener("icecandidateerror", onError);
  b.addEventListener("icecandidateerror", onError);
  let relayCandidates = 0;
  a.onicecandidate = (e) => {
    if (e.candidate) { relayCandidates += 1; b.addIceCandidate(e.candidate).catch(() => {}); }
  };
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate).catch(() => {});
  try {
    a.addTrack(audio.track, audio.stream);
    const channel = a.createDataChannel("preflight");
    const echoed = new Promise((resolve) => {
      b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send(m.data); };
      channel.onmessage = (m) => resolve(m.data);
      channel.onopen = () => channel.send("ping " + url);
    });
    const connected = new Promise((resolve, reject) => {
      a.onconnectionstatechange = () => {
        if (a.connectionState === "connected") resolve();
        if (a.connectionState === "failed") reject(new Error("ICE failed: no relay path"));
      };
      // No relay candidate at all: the allocation failed (e.g. 401); no need to wait
      a.onicegatheringstatechange = () => {
        if (a.iceGatheringState === "complete" && relayCandidates === 0) {
          reject(new Error("no relay candidate: the TURN allocation failed"));
        }
      };
    });
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("timed out")), TIMEOUT_MS));
    await Promise.race([connected, timeout]);
    result.connected = true;
    result.dataEcho = (await Promise.race([echoed, timeout])) === "ping " + url;
    await new Promise((r) => setTimeout(r, 3000));  // a call's few seconds of audio
    const pairB = await selectedPair(b);  // b receives a's audio
    const pairA = await selectedPair(a);
    result.pair = pairA && { local: pairA.local, remote: pairA.remote,
                             localType: pairA.localType, remoteType: pairA.remoteType };
    result.audioPacketsReceived = pairB ? pairB.audio.packetsReceived : 0;
    if (pairA && pairB && pairA.loopRttMs != null) {
      const ab = pairB.audio;
      const total = ab.packetsLost + ab.packetsReceived;
      result.quality = quality(pairA.loopRttMs, ab.jitter * 1000, total ? ab.packetsLost / total : 0);
      result.rttMs = result.quality.rttMs;
    }
  } catch (e) {
    result.error = String(e.message || e);
  } finally {
    a.close(); b.close(); audio.stop();
  }
  result.ok = result.connected && result.dataEcho &&
              !!result.pair && result.pair.localType === "relay" && result.pair.remoteType === "relay";
  result.verdict = !result.ok ? FAILS : result.quality ? result.quality.verdict : WORKS;
  result.hint = hintFor(result);
  return result;
}

function render(results) {
  const rows = document.getElementById("rows");
  rows.innerHTML = "";
  for (const r of results) {
    const tr = document.createElement("tr");
    const q = r.quality;
    const cells = [
      r.transport,
      r.verdict,
      r.pair ? `${r.pair.local} ⇄ ${r.pair.remote}` : "-",
      q ? `${q.rttMs} ms` : "-",
      q ? `${q.jitterMs} ms` : "-",
      q ? `${(q.loss * 100).toFixed(1)} %` : "-",
      q ? `${q.mos.toFixed(2)} ${q.grade}` : "-",
      String(r.audioPacketsReceived),
      [r.error, ...r.turnErrors, ...(q ? q.warnings : []), r.hint].filter(Boolean).join("; ") || "-",
    ];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = r.verdict === WORKS ? "ok" : r.verdict === POOR ? "poor" : "fail";
      tr.appendChild(td);
    });
    rows.appendChild(tr);
  }
}

// Every step of testUri has its own bound; this one makes sure a browser that never
// settles a WebRTC call (offer, stats) still gets a report rather than a page that hangs.
function bounded(test, url) {
  const limit = 2 * TIMEOUT_MS + 10000;
  const late = new Promise((resolve) => setTimeout(() => resolve({
    url, transport: transportOf(url), connected: false, pair: null, rttMs: null, quality: null,
    verdict: FAILS, ok: false, audioPacketsReceived: 0, dataEcho: false, turnErrors: [],
    error: `the browser did not finish this test in ${limit / 1000} s`, hint: "",
  }), limit));
  return Promise.race([test, late]);
}

async function main() {
  const status = document.getElementById("status");
  document.getElementById("start").disabled = true;
  const report = { startedAt: new Date().toISOString(), userAgent: navigator.userAgent, results: [] };
  try {
    const params = new URLSearchParams(location.search);
    const resp = await fetch("preflight/credentials" + (params.has("bad") ? "?bad=1" : ""),
                             { signal: AbortSignal.timeout(TIMEOUT_MS) });
    if (!resp.ok) throw new Error(`credentials: HTTP ${resp.status}`);
    const cred = await resp.json();
    const urls = cred.uris.filter((u) => u.startsWith("turn"));
    status.textContent = `Testing ${urls.length} transports…`;
    for (const url of urls) {
      report.results.push(await bounded(testUri(url, cred.username, cred.password), url));
      render(report.results);
    }
    const working = report.results.filter((r) => r.ok).map((r) => r.transport);
    const good = report.results.filter((r) => r.verdict === WORKS).map((r) => r.transport);
    const poor = report.results.filter((r) => r.verdict === POOR);
    report.audioContextState = audioContext.state;
    report.working = working;
    const parts = [];
    if (good.length) parts.push(`media flows through ${good.join(", ")}`);
    if (poor.length) {
      const why = [...new Set(poor.flatMap((r) => r.quality.warnings))].sort();
      parts.push(`${poor.map((r) => r.transport).join(", ")} ${POOR} (${why.join(", ")})`);
    }
    report.verdict = parts.length ? parts.join("; ") : "no media path works";
    status.textContent = report.verdict;
  } catch (e) {
    report.error = String(e.message || e);
    status.textContent = "Test failed: " + report.error;
  }
  report.finishedAt = new Date().toISOString();
  document.getElementById("report").textContent = JSON.stringify(report, null, 2);
  window.preflightReport = report;
}

document.getElementById("copy").onclick = () =>
  navigator.clipboard.writeText(document.getElementById("report").textContent);
document.getElementById("start").onclick = async () => {
  audioContext = new AudioContext();  // created by the click: allowed to run
  await audioContext.resume();
  main();
};
