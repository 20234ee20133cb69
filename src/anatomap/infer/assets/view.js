/* anatomap view: the match viewer's script (see anatomap/infer/view.py).
 *
 * Two NiiVue instances show the template and one target as orthogonal slices. Markers
 * (overlay volumes drawn here) are the full-precision matches, coloured by score or by
 * P(within 5 mm). A click on the template is matched in the target here, on the reduced
 * (PCA, int8) embeddings the page carries, with the algorithm of
 * anatomap.infer.match.match_points: the template's coarse and fine vectors at the point
 * (trilinear, unit length), the best `candidates` coarse voxels of the target, and for each
 * the best coarse + fine similarity among the fine voxels within `radius` mm of it (coarse
 * term: the coarse similarities interpolated trilinearly at the fine voxel, divided by the
 * norm of the interpolated coarse vector); the best candidate wins, ties to the first.
 *
 * Test hook: window.anatomapView = {ready, error, clickTemplate(mm) -> Promise(match),
 * selectTarget(index) -> Promise, crosshairMm('template'|'target'), heatValueAt(mm),
 * volumeCounts(), last}.
 */
(function () {
  "use strict";
  const view = { ready: false, error: null, last: null };
  window.anatomapView = view;
  const DATA = JSON.parse(document.getElementById("anatomap-data").textContent);
  const EPS = 1e-12; // F.normalize's floor on a norm
  const SCORE_CMAP = {
    // transparent 0, then red (low) - amber - green (high), indices 1..255
    R: [0, 215, 250, 26],
    G: [0, 48, 200, 152],
    B: [0, 39, 60, 80],
    A: [0, 255, 255, 255],
    I: [0, 1, 128, 255],
  };
  const HEAT_CMAP = "warm";
  const HEAT_TOP = 0.05; // the heat map shows the most similar 5% of the target's fine voxels
  const status = document.getElementById("status");

  // -- numbers --------------------------------------------------------------------------
  function bytes(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // as anatomap.geometry.apply_affine: ((p0*a0 + p1*a1) + p2*a2) + t, per row
  function apply(a, p) {
    const out = [0, 0, 0];
    for (let r = 0; r < 3; r++) out[r] = p[0] * a[r][0] + p[1] * a[r][1] + p[2] * a[r][2] + a[r][3];
    return out;
  }

  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  function interp(x, xs, ys) { // numpy.interp
    if (x <= xs[0]) return ys[0];
    const n = xs.length;
    if (x >= xs[n - 1]) return ys[n - 1];
    let i = 1;
    while (xs[i] < x) i++;
    if (xs[i] === xs[i - 1]) return ys[i];
    return ys[i - 1] + ((x - xs[i - 1]) * (ys[i] - ys[i - 1])) / (xs[i] - xs[i - 1]);
  }

  // int8 codes -> float32 values code * scale + offset (each step rounded to float32, as
  // numpy computes Reduction.values), voxel-major [X, Y, Z, K]
  function featureMap(m, scale, offset) {
    const q = new Int8Array(bytes(m.data).buffer);
    const v = new Float32Array(q.length);
    const k = m.k;
    for (let i = 0, c = 0; i < q.length; i++, c = c + 1 === k ? 0 : c + 1) {
      v[i] = Math.fround(q[i] * scale[c]) + offset[c];
    }
    return { shape: m.shape, k, v, affine: m.affine, inv: m.inv };
  }

  // trilinear sample at continuous indices clamped into the map, re-normalised (sample_map)
  function sampleUnit(map, ijk) {
    const [, ny, nz] = map.shape;
    const k = map.k;
    const lo = [0, 0, 0];
    const fr = [0, 0, 0];
    for (let a = 0; a < 3; a++) {
      const n = map.shape[a];
      const x = Math.min(Math.max(ijk[a], 0), n - 1);
      lo[a] = Math.floor(x);
      fr[a] = x - lo[a];
    }
    const out = new Float64Array(k);
    for (let c = 0; c < 8; c++) {
      const d = [(c >> 2) & 1, (c >> 1) & 1, c & 1];
      let w = 1;
      for (let a = 0; a < 3; a++) w *= d[a] ? fr[a] : 1 - fr[a];
      if (w === 0) continue;
      const base = ((lo[0] + d[0]) * ny + (lo[1] + d[1])) * nz + (lo[2] + d[2]);
      for (let j = 0; j < k; j++) out[j] += w * map.v[base * k + j];
    }
    let norm = 0;
    for (let j = 0; j < k; j++) norm += out[j] * out[j];
    norm = Math.max(Math.sqrt(norm), EPS);
    for (let j = 0; j < k; j++) out[j] /= norm;
    return out;
  }

  // per target: each fine voxel's coarse corners, their weights (grid_sample, zero padding)
  // and the norm of the interpolated coarse vector
  function prepare(t) {
    if (t.prep) return t.prep;
    const C = t.coarse;
    const [fx, fy, fz] = t.fine.shape;
    const nF = fx * fy * fz;
    const corner = new Int32Array(nF * 8).fill(-1);
    const weight = new Float32Array(nF * 8);
    const norm = new Float32Array(nF);
    const acc = new Float64Array(C.k);
    let v = 0;
    for (let i = 0; i < fx; i++) for (let j = 0; j < fy; j++) for (let l = 0; l < fz; l++, v++) {
      const x = apply(t.f2c, [i, j, l]);
      const lo = [0, 0, 0];
      const fr = [0, 0, 0];
      for (let a = 0; a < 3; a++) {
        const xa = C.shape[a] > 1 ? x[a] : 0;
        lo[a] = Math.floor(xa);
        fr[a] = xa - lo[a];
      }
      acc.fill(0);
      for (let c = 0; c < 8; c++) {
        const d = [(c >> 2) & 1, (c >> 1) & 1, c & 1];
        const at = [lo[0] + d[0], lo[1] + d[1], lo[2] + d[2]];
        let w = 1;
        for (let a = 0; a < 3; a++) {
          if (at[a] < 0 || at[a] >= C.shape[a]) w = 0;
          else w *= d[a] ? fr[a] : 1 - fr[a];
        }
        if (w === 0) continue;
        const m = (at[0] * C.shape[1] + at[1]) * C.shape[2] + at[2];
        corner[v * 8 + c] = m;
        weight[v * 8 + c] = w;
        for (let q = 0; q < C.k; q++) acc[q] += w * C.v[m * C.k + q];
      }
      let s = 0;
      for (let q = 0; q < C.k; q++) s += acc[q] * acc[q];
      norm[v] = Math.max(Math.sqrt(s), EPS);
    }
    t.prep = { corner, weight, norm };
    return t.prep;
  }

  function topK(sim, k) { // indices of the k largest values, largest first
    const top = [];
    for (let m = 0; m < sim.length; m++) {
      if (top.length === k && sim[m] <= sim[top[k - 1]]) continue;
      let at = top.length === k ? k - 1 : top.length;
      top[at] = m;
      while (at > 0 && sim[top[at]] > sim[top[at - 1]]) {
        [top[at], top[at - 1]] = [top[at - 1], top[at]];
        at--;
      }
    }
    return top;
  }

  // coarse + fine similarity of the point to every fine voxel of target t ([X, Y, Z] order)
  function combined(qc, qf, t) {
    const P = prepare(t);
    const C = t.coarse;
    const Fm = t.fine;
    const nC = C.shape[0] * C.shape[1] * C.shape[2];
    const sim = new Float32Array(nC);
    for (let m = 0; m < nC; m++) {
      let s = 0;
      for (let q = 0; q < C.k; q++) s += qc[q] * C.v[m * C.k + q];
      sim[m] = s;
    }
    const nF = Fm.shape[0] * Fm.shape[1] * Fm.shape[2];
    const comb = new Float32Array(nF);
    for (let v = 0; v < nF; v++) {
      let f = 0;
      for (let q = 0; q < Fm.k; q++) f += qf[q] * Fm.v[v * Fm.k + q];
      let num = 0;
      for (let c = 0; c < 8; c++) {
        const m = P.corner[v * 8 + c];
        if (m >= 0) num += P.weight[v * 8 + c] * sim[m];
      }
      comb[v] = f + num / P.norm[v];
    }
    return { sim, comb };
  }

  function refine(t, top, comb) {
    const [fx, fy, fz] = t.fine.shape;
    const [cx, cy, cz] = t.coarse.shape;
    const h = t.half;
    let best = -Infinity;
    let win = null;
    let firstCentre = null;
    for (const m of top) {
      const ijkC = [Math.floor(m / (cy * cz)), Math.floor(m / cz) % cy, m % cz];
      const centre = apply(t.coarse.affine, ijkC);
      const c0 = apply(t.fine.inv, centre).map(roundHalfEven);
      if (firstCentre === null) firstCentre = c0;
      let bv = -Infinity;
      let bw = null;
      for (let a = -h[0]; a <= h[0]; a++) for (let b = -h[1]; b <= h[1]; b++) for (let c = -h[2]; c <= h[2]; c++) {
        const v = [c0[0] + a, c0[1] + b, c0[2] + c];
        if (v[0] < 0 || v[1] < 0 || v[2] < 0 || v[0] >= fx || v[1] >= fy || v[2] >= fz) continue;
        const w = apply(t.fine.affine, v);
        const d = [w[0] - centre[0], w[1] - centre[1], w[2] - centre[2]];
        if (Math.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) > t.radius) continue;
        const s = comb[(v[0] * fy + v[1]) * fz + v[2]];
        if (s > bv) { bv = s; bw = v; }
      }
      if (bv > best) { best = bv; win = bw; }
    }
    if (win === null) { // nothing inside the map and the radius: match_points' fallback
      win = firstCentre.map((x, a) => Math.min(Math.max(x - h[a], 0), t.fine.shape[a] - 1));
    }
    return { win, best };
  }

  function matchPoint(mm, t) {
    const T = TEMPLATE;
    const qc = sampleUnit(T.coarse, apply(T.coarse.inv, mm));
    const qf = sampleUnit(T.fine, apply(T.fine.inv, mm));
    const { sim, comb } = combined(qc, qf, t);
    const top = topK(sim, Math.min(DATA.candidates, sim.length));
    const { win, best } = refine(t, top, comb);
    const score = best / 2;
    const p = DATA.calibration ? interp(score, DATA.calibration.x, DATA.calibration.y) : null;
    return { mm: apply(t.fine.affine, win), voxel: win, score, p, coarse: sim[top[0]], comb };
  }

  // -- page state -----------------------------------------------------------------------
  const TEMPLATE = Object.assign({}, DATA.template, {
    coarse: featureMap(DATA.template.coarse, DATA.scale.coarse, DATA.offset.coarse),
    fine: featureMap(DATA.template.fine, DATA.scale.fine, DATA.offset.fine),
  });
  const TARGETS = DATA.targets.map((t) => Object.assign({}, t, {
    coarse: featureMap(t.coarse, DATA.scale.coarse, DATA.offset.coarse),
    fine: featureMap(t.fine, DATA.scale.fine, DATA.offset.fine),
  }));
  let current = 0;
  let tplNv = null;
  let tgtNv = null;
  let tplMarkers = null;
  let lastClick = null;
  let internal = false;

  function colourValue(ti, n) {
    const t = TARGETS[ti];
    const v = DATA.colour_by === "p_within_5mm" ? t.probs[n] : t.scores[n];
    return Math.min(Math.max(v, 0), 1);
  }

  function cmapColour(cmap, v) { // css colour of value v in [0, 1] on a NiiVue colour map
    const x = 1 + v * 254;
    const I = cmap.I;
    let i = 1;
    while (i < I.length - 1 && I[i] < x) i++;
    const f = I[i] === I[i - 1] ? 1 : Math.min(Math.max((x - I[i - 1]) / (I[i] - I[i - 1]), 0), 1);
    const c = ["R", "G", "B"].map((ch) => Math.round(cmap[ch][i - 1] + f * (cmap[ch][i] - cmap[ch][i - 1])));
    return "rgb(" + c.join(",") + ")";
  }

  // spheres of the marker colour at points (world mm) on a display grid (NIfTI order)
  function drawMarkers(img, scan, points, values) {
    const [nx, ny, nz] = scan.shape;
    const sp = [0, 1, 2].map((c) => Math.hypot(scan.affine[0][c], scan.affine[1][c], scan.affine[2][c]));
    const r = Math.max(4, 2.2 * Math.max(...sp));
    img.fill(0);
    points.forEach((p, n) => {
      const c = apply(scan.inv, p);
      const code = 1 + Math.round(254 * values[n]);
      const lo = c.map((x, a) => Math.max(0, Math.ceil(x - r / sp[a])));
      const hi = c.map((x, a) => Math.min(scan.shape[a] - 1, Math.floor(x + r / sp[a])));
      for (let i = lo[0]; i <= hi[0]; i++) for (let j = lo[1]; j <= hi[1]; j++) for (let k = lo[2]; k <= hi[2]; k++) {
        const d = ((i - c[0]) * sp[0]) ** 2 + ((j - c[1]) * sp[1]) ** 2 + ((k - c[2]) * sp[2]) ** 2;
        if (d <= r * r) img[i + nx * (j + ny * k)] = code;
      }
    });
  }

  async function makeViewer(canvasId) {
    const nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1],
      show3Dcrosshair: false,
      crosshairWidth: 0.75, // voxels of the shown image: thinner lines can vanish
      crosshairWidthUnit: "voxels",
      crosshairColor: [0.3, 0.85, 1, 1],
      isColorbar: false,
      isNearestInterpolation: true,
      dragAndDropEnabled: false,
      multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
      multiplanarLayout: niivue.MULTIPLANAR_TYPE.GRID,
      logLevel: "error",
      loadingText: "",
    });
    await nv.attachToCanvas(document.getElementById(canvasId));
    nv.addColormap("anatomap_score", SCORE_CMAP);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    return nv;
  }

  async function loadImage(b64, name, opts) {
    return niivue.NVImage.loadFromBase64(Object.assign({ base64: b64, name }, opts || {}));
  }

  // an overlay on a scan's display grid for the markers (the image loaded again, zeroed)
  async function markerVolume(nv, scan) {
    const m = await loadImage(scan.image, "markers.nii.gz");
    m.img.fill(0);
    nv.addVolume(m);
    nv.setColormap(m.id, "anatomap_score");
    m.cal_min = 0;
    m.cal_max = 255;
    return m;
  }

  async function targetVolumes(t) {
    if (!t.nv) {
      const image = await loadImage(t.image, "target.nii.gz", { colormap: "gray" });
      const heat = await loadImage(t.heat, "similarity.nii.gz", { colormap: HEAT_CMAP, opacity: 0.65 });
      t.nv = { image, heat, markers: null };
    }
    return t.nv;
  }

  function setCrosshair(nv, mm) {
    nv.scene.crosshairPos = nv.mm2frac([mm[0], mm[1], mm[2]]);
    nv.drawScene();
  }

  function crosshairMm(nv) {
    return Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3);
  }

  function fmt(p) {
    return "(" + p.map((x) => x.toFixed(1)).join(", ") + ")";
  }

  function showHeat(t, res) {
    const heat = t.nv.heat;
    const [fx, fy, fz] = t.fine.shape;
    const comb = res.comb;
    let v = 0;
    for (let i = 0; i < fx; i++) for (let j = 0; j < fy; j++) for (let k = 0; k < fz; k++, v++) {
      heat.img[i + fx * (j + fy * k)] = comb[v] / 2;
    }
    const sorted = Float32Array.from(comb).sort();
    const top = sorted[sorted.length - 1] / 2;
    let low = sorted[Math.floor((1 - HEAT_TOP) * (sorted.length - 1))] / 2;
    if (!(top - low > 1e-4)) low = top - 1e-4;
    heat.cal_min = low;
    heat.cal_max = top;
    tgtNv.updateGLVolume();
  }

  async function update(mm) {
    const t = TARGETS[current];
    const res = matchPoint(mm, t);
    lastClick = mm;
    showHeat(t, res);
    setCrosshair(tgtNv, res.mm);
    const prob = res.p === null ? "" : ", P(within 5 mm) " + res.p.toFixed(2);
    status.classList.remove("error");
    status.textContent = "Template " + fmt(mm) + " mm -> " + t.name + " " + fmt(res.mm) +
      " mm, score " + res.score.toFixed(3) + prob + " (computed in the page from " +
      TEMPLATE.fine.k + "-component int8 embeddings; the table's matches are full precision).";
    view.last = { template: mm.slice(), mm: res.mm, voxel: res.voxel, score: res.score, p: res.p, target: current };
    return view.last;
  }

  async function clickTemplate(mm) {
    internal = true;
    try {
      setCrosshair(tplNv, mm);
    } finally {
      internal = false;
    }
    return update(mm);
  }

  function fillTable() {
    const t = TARGETS[current];
    const table = document.getElementById("points");
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    const cols = ["point", "template (mm)", "match in " + t.name + " (mm)", "score"];
    if (t.probs) cols.push("P(within 5 mm)");
    cols.push("");
    cols.forEach((c) => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
    const body = table.createTBody();
    DATA.points.names.forEach((name, n) => {
      const row = body.insertRow();
      const cell = (text) => { const td = row.insertCell(); td.textContent = text; return td; };
      const first = cell(name);
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = cmapColour(SCORE_CMAP, colourValue(current, n));
      first.prepend(sw);
      cell(fmt(DATA.points.mm[n]));
      cell(fmt(t.matches[n]));
      cell(t.scores[n].toFixed(3));
      if (t.probs) cell(t.probs[n].toFixed(2));
      const flag = cell(t.low[n] ? "low confidence" : "");
      flag.className = "flag";
      if (t.low[n]) row.className = "low";
      row.addEventListener("click", () => clickTemplate(DATA.points.mm[n]));
    });
  }

  function legend() {
    const box = document.getElementById("legend");
    box.replaceChildren();
    const bar = (label, cmap, lo, hi) => {
      const div = document.createElement("div");
      const stops = [];
      for (let s = 0; s <= 10; s++) stops.push(cmapColour(cmap, s / 10));
      const span = document.createElement("span");
      span.className = "bar";
      span.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
      div.append(label + ": " + lo, span, hi);
      box.appendChild(div);
    };
    const what = DATA.colour_by === "p_within_5mm" ? "P(match within 5 mm)" : "match score (mean cosine similarity)";
    bar("Markers (template points and their matches), " + what, SCORE_CMAP, "0", "1");
    const heat = tgtNv.colormapFromKey(HEAT_CMAP);
    const I = heat.I;
    const norm = Object.assign({}, heat, { I: I.map((x) => 1 + (254 * (x - I[0])) / (I[I.length - 1] - I[0])) });
    bar("Heat map: similarity to the clicked point", norm, "top " + 100 * HEAT_TOP + "%", "best");
    const cross = document.createElement("div");
    cross.textContent = "Crosshairs: the clicked point (template) and its best match (target).";
    box.appendChild(cross);
  }

  async function selectTarget(i) {
    if (!(Number.isInteger(i) && i >= 0 && i < TARGETS.length)) {
      throw new Error("no target " + i + " (the page has " + TARGETS.length + ")");
    }
    current = i;
    const t = TARGETS[i];
    const vols = await targetVolumes(t);
    while (tgtNv.volumes.length) tgtNv.removeVolume(tgtNv.volumes[0]);
    tgtNv.addVolume(vols.image);
    tgtNv.addVolume(vols.heat);
    if (!vols.markers) {
      vols.markers = await markerVolume(tgtNv, t);
      drawMarkers(vols.markers.img, t, t.matches, t.matches.map((_, n) => colourValue(i, n)));
    } else {
      tgtNv.addVolume(vols.markers);
    }
    tgtNv.setColormap(vols.markers.id, "anatomap_score");
    vols.markers.cal_min = 0;
    vols.markers.cal_max = 255;
    drawMarkers(tplMarkers.img, TEMPLATE, DATA.points.mm, DATA.points.mm.map((_, n) => colourValue(i, n)));
    tplNv.updateGLVolume();
    tgtNv.updateGLVolume();
    document.getElementById("target-select").value = String(i);
    fillTable();
    if (lastClick) await update(lastClick);
  }

  async function init() {
    document.getElementById("template-name").textContent = TEMPLATE.name +
      (TEMPLATE.shown === "image" ? "" : " (" + TEMPLATE.shown + ")");
    const select = document.getElementById("target-select");
    TARGETS.forEach((t, i) => {
      const o = document.createElement("option");
      o.value = String(i);
      o.textContent = t.name + (t.shown === "image" ? "" : " (" + t.shown + ")");
      select.appendChild(o);
    });
    select.addEventListener("change", () => selectTarget(Number(select.value)));
    tplNv = await makeViewer("template-canvas");
    tgtNv = await makeViewer("target-canvas");
    const image = await loadImage(TEMPLATE.image, "template.nii.gz", { colormap: "gray" });
    tplNv.addVolume(image);
    tplMarkers = await markerVolume(tplNv, TEMPLATE);
    await selectTarget(0);
    tplNv.onLocationChange = (d) => {
      if (!internal && d && d.mm) update(Array.from(d.mm).slice(0, 3));
    };
    legend();
    document.getElementById("footer").textContent = "anatomap match viewer. Live matches use " +
      TEMPLATE.coarse.k + " coarse and " + TEMPLATE.fine.k + " fine principal components (int8). " +
      "Rendering: NiiVue " + DATA.niivue_version + " (BSD-2-Clause), inlined; the page needs no network.";
    const first = DATA.points.mm[0];
    await clickTemplate(first);
  }

  view.clickTemplate = (mm) => clickTemplate(Array.from(mm));
  view.selectTarget = (i) => selectTarget(i);
  view.crosshairMm = (which) => crosshairMm(which === "template" ? tplNv : tgtNv);
  view.niivue = () => ({ template: tplNv, target: tgtNv });
  view.volumeCounts = () => ({ template: tplNv.volumes.length, target: tgtNv.volumes.length });
  view.heatValueAt = (mm) => { // NiiVue's own look-up of the heat overlay at a world point
    const heat = TARGETS[current].nv.heat;
    const vox = heat.mm2vox(Array.from(mm));
    return heat.getValue(vox[0], vox[1], vox[2]);
  };
  view.heatMax = () => TARGETS[current].nv.heat.cal_max;
  init().then(() => { view.ready = true; }).catch((e) => {
    view.error = String(e && e.stack ? e.stack : e);
    status.classList.add("error");
    status.textContent = "The viewer failed: " + e;
    console.error(e);
  });
})();
