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

function hintFor(result) {
  if (result.ok) return null;
  if (result.transport === "tls") {
    return "TLS (turns:) failed: if the other transports work, the browser most likely does " +
           "not trust the server's certificate (self-signed, expired, or not for this host " +
           "name). `turnserver preflight` names the exact TLS error.";
  }
  if (result.turnErrors.some((e) => e.startsWith("401"))) {
    return "the credential was refused (401): wrong shared secret, realm, or an expired credential";
  }
  if (result.turnErrors.some((e) => e.startsWith("701"))) {
    return "the TURN server could not be reached over this transport (blocked by a firewall?)";
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
  let packets = 0;
  stats.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "audio") packets += s.packetsReceived || 0; });
  return {
    local: `${local.candidateType} ${local.protocol} ${local.address || local.ip}:${local.port}` +
           (local.relayProtocol ? ` (relay over ${local.relayProtocol})` : ""),
    remote: `${remote.candidateType} ${remote.protocol} ${remote.address || remote.ip}:${remote.port}`,
    localType: local.candidateType, remoteType: remote.candidateType,
    rttMs: pair.currentRoundTripTime != null ? Math.round(pair.currentRoundTripTime * 1000 * 10) / 10 : null,
    audioPacketsReceived: packets,
  };
}

async function testUri(url, username, credential) {
  const result = { url, transport: transportOf(url), connected: false, pair: null, rttMs: null,
                   audioPacketsReceived: 0, dataEcho: false, turnErrors: [], error: null };
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
    await new Promise((r) => setTimeout(r, 1500));  // let audio flow
    const pair = await selectedPair(b);
    const pairA = await selectedPair(a);
    result.pair = pairA;
    result.rttMs = pairA && pairA.rttMs;
    result.audioPacketsReceived = pair ? pair.audioPacketsReceived : 0;
  } catch (e) {
    result.error = String(e.message || e);
  } finally {
    a.close(); b.close(); audio.stop();
  }
  result.ok = result.connected && result.dataEcho &&
              !!result.pair && result.pair.localType === "relay" && result.pair.remoteType === "relay";
  result.hint = hintFor(result);
  return result;
}

function render(results) {
  const rows = document.getElementById("rows");
  rows.innerHTML = "";
  for (const r of results) {
    const tr = document.createElement("tr");
    const cells = [
      r.transport,
      r.ok ? "connected" : "failed",
      r.pair ? `${r.pair.local} ⇄ ${r.pair.remote}` : "-",
      r.rttMs != null ? `${r.rttMs} ms` : "-",
      String(r.audioPacketsReceived),
      r.dataEcho ? "echoed" : "-",
      [r.error, ...r.turnErrors, r.hint].filter(Boolean).join("; ") || "-",
    ];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = r.ok ? "ok" : "fail";
      tr.appendChild(td);
    });
    rows.appendChild(tr);
  }
}

async function main() {
  const status = document.getElementById("status");
  document.getElementById("start").disabled = true;
  const report = { startedAt: new Date().toISOString(), userAgent: navigator.userAgent, results: [] };
  try {
    const params = new URLSearchParams(location.search);
    const resp = await fetch("preflight/credentials" + (params.has("bad") ? "?bad=1" : ""));
    if (!resp.ok) throw new Error(`credentials: HTTP ${resp.status}`);
    const cred = await resp.json();
    const urls = cred.uris.filter((u) => u.startsWith("turn"));
    status.textContent = `Testing ${urls.length} transports…`;
    for (const url of urls) {
      report.results.push(await testUri(url, cred.username, cred.password));
      render(report.results);
    }
    const working = report.results.filter((r) => r.ok).map((r) => r.transport);
    report.audioContextState = audioContext.state;
    report.working = working;
    report.verdict = working.length ? `media flows through ${working.join(", ")}` : "no relay path works";
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
