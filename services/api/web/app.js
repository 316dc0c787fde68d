// Tributary web UI: the live parts. Plain JavaScript, no framework.
//
// * Build page: one EventSource on the build's event stream (see services/api/src/web/live.rs)
//   fills one log per job, incrementally (batches per animation frame, at most MAX_LINES lines
//   per job in the page), renders ANSI colours, numbers every line (#L<job>-<n> links to it),
//   follows the bottom until the reader scrolls up, and re-fetches the summary (statuses,
//   exit codes, durations) when the build moves. Output is placed by the line it belongs to
//   (its attempt, step and line: one section per line, in that order), never "under the last
//   line shown": on a partitioned log chunks and line events arrive in no fixed relative order.
// * Build page's history: the build's steps are fetched once (as JSON) when "History" is
//   opened; moving the slider shows the summary as it stood at that step (the server folds it
//   from the build's events), and live refreshes of the summary wait until "Now".
// * Project page: re-fetches the builds table when the project's event stream says so.
(function () {
  'use strict';

  var MAX_LINES = 20000;      // log lines kept in the page per job
  var FRAME_BUDGET_MS = 12;   // rendering work per animation frame
  var QUEUE_HIGH = 4000;      // events waiting to be rendered: stop reading the stream...
  var QUEUE_LOW = 500;        // ...and resume from the next offset once under this
  var TAIL_BYTES = 1000000;   // a long log opens at its last ~1 MB ("load all" for the rest)

  // ---------------------------------------------------------------- ANSI SGR -> spans
  function Ansi() { this.reset(); this.partial = ''; }
  Ansi.prototype.reset = function () {
    this.fg = null; this.bg = null; this.fgRgb = null; this.bgRgb = null;
    this.bold = false; this.dim = false; this.italic = false; this.underline = false;
  };
  function xterm256(n) {
    if (n < 16) return null;
    if (n >= 232) { var g = 8 + (n - 232) * 10; return 'rgb(' + g + ',' + g + ',' + g + ')'; }
    n -= 16;
    var c = [0, 95, 135, 175, 215, 255];
    return 'rgb(' + c[Math.floor(n / 36)] + ',' + c[Math.floor(n / 6) % 6] + ',' + c[n % 6] + ')';
  }
  Ansi.prototype.sgr = function (params) {
    var p = params === '' ? [0] : params.split(';').map(function (x) { return parseInt(x, 10) || 0; });
    for (var i = 0; i < p.length; i++) {
      var c = p[i];
      if (c === 0) this.reset();
      else if (c === 1) this.bold = true;
      else if (c === 2) this.dim = true;
      else if (c === 3) this.italic = true;
      else if (c === 4) this.underline = true;
      else if (c === 22) { this.bold = false; this.dim = false; }
      else if (c === 23) this.italic = false;
      else if (c === 24) this.underline = false;
      else if (c >= 30 && c <= 37) { this.fg = c - 30; this.fgRgb = null; }
      else if (c >= 90 && c <= 97) { this.fg = c - 90 + 8; this.fgRgb = null; }
      else if (c === 39) { this.fg = null; this.fgRgb = null; }
      else if (c >= 40 && c <= 47) { this.bg = c - 40; this.bgRgb = null; }
      else if (c >= 100 && c <= 107) { this.bg = c - 100 + 8; this.bgRgb = null; }
      else if (c === 49) { this.bg = null; this.bgRgb = null; }
      else if ((c === 38 || c === 48) && p[i + 1] === 5) {
        var n = p[i + 2] || 0, rgb = xterm256(n);
        if (c === 38) { this.fg = rgb ? null : n; this.fgRgb = rgb; } else { this.bg = rgb ? null : n; this.bgRgb = rgb; }
        i += 2;
      } else if ((c === 38 || c === 48) && p[i + 1] === 2) {
        var col = 'rgb(' + (p[i + 2] || 0) + ',' + (p[i + 3] || 0) + ',' + (p[i + 4] || 0) + ')';
        if (c === 38) { this.fg = null; this.fgRgb = col; } else { this.bg = null; this.bgRgb = col; }
        i += 4;
      }
    }
  };
  Ansi.prototype.styled = function () {
    return this.fg !== null || this.bg !== null || this.fgRgb || this.bgRgb ||
      this.bold || this.dim || this.italic || this.underline;
  };
  Ansi.prototype.span = function (text) {
    if (!this.styled()) return document.createTextNode(text);
    var s = document.createElement('span'), cls = [];
    if (this.fg !== null) cls.push('f' + this.fg);
    if (this.bg !== null) cls.push('b' + this.bg);
    if (this.bold) cls.push('bo');
    if (this.dim) cls.push('dm');
    if (this.italic) cls.push('it');
    if (this.underline) cls.push('ul');
    s.className = cls.join(' ');
    if (this.fgRgb) s.style.color = this.fgRgb;
    if (this.bgRgb) s.style.backgroundColor = this.bgRgb;
    s.textContent = text;
    return s;
  };
  // Appends `text` (no newline in it) to `el`, turning SGR sequences into spans and dropping
  // other control sequences. An escape cut at the end of a chunk waits for the next one.
  Ansi.prototype.render = function (text, el) {
    text = this.partial + text;
    this.partial = '';
    var re = /\x1b(?:\[([0-9;?]*)([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])/g, last = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) el.appendChild(this.span(text.slice(last, m.index).replace(/\r/g, '')));
      if (m[2] === 'm') this.sgr(m[1] || '');
      last = re.lastIndex;
    }
    var rest = text.slice(last), esc = rest.indexOf('\x1b');
    if (esc >= 0 && rest.length - esc < 32) { this.partial = rest.slice(esc); rest = rest.slice(0, esc); }
    rest = rest.replace(/\r/g, '');
    if (rest) el.appendChild(this.span(rest));
  };

  function duration(us) {
    var ms = Math.floor(us / 1000);
    if (ms < 1000) return ms + ' ms';
    if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
    return Math.floor(ms / 60000) + ' m ' + String(Math.floor(ms / 1000) % 60).padStart(2, '0') + ' s';
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---------------------------------------------------------------- one job's log
  function JobLog(details, index, page) {
    this.details = details;
    this.box = details.querySelector('.log');
    this.btn = details.querySelector('button.follow');
    this.index = index;
    this.page = page;
    this.n = 0;             // lines numbered so far
    this.inPage = 0;        // line elements in the page
    this.cur = null;        // the open (unterminated) line's text element...
    this.curSec = null;     // ...in this section
    this.ansi = new Ansi();
    this.follow = true;
    this.dirty = false;     // rendered since the last flush
    this.secs = [];         // sections in page order: {k: [attempt, step, line], el, lines, res}
    this.byKey = {};        // "a-s-l" -> section
    this.cmds = {};         // "a-s-l" -> result element of a command header
    this.chunked = {};      // attempts whose first chunk was seen
    this.notice = null;
    var self = this;
    this.box.addEventListener('scroll', function () {
      var atBottom = self.box.scrollTop + self.box.clientHeight >= self.box.scrollHeight - 8;
      if (atBottom !== self.follow) {
        self.follow = atBottom;
        self.btn.hidden = atBottom;
        if (atBottom) page.resumeIfPaused();
      }
    });
    this.btn.addEventListener('click', function () {
      self.follow = true; self.btn.hidden = true;
      self.box.scrollTop = self.box.scrollHeight;
      page.resumeIfPaused();
    });
  }
  function before(x, y) { return x[0] - y[0] || x[1] - y[1] || x[2] - y[2]; }
  // The section of attempt a, step s, line l (step -1: the attempt's own markers; line -1:
  // the step's name), created in (a, s, l) order among the others.
  JobLog.prototype.section = function (a, s, l) {
    var id = a + '-' + s + '-' + l, sec = this.byKey[id];
    if (sec) return sec;
    sec = { k: [a, s, l], el: el('div', 'seg'), lines: 0, res: null };
    sec.el.setAttribute('data-line', id);
    var i = this.secs.length;
    while (i > 0 && before(this.secs[i - 1].k, sec.k) > 0) i--;
    this.box.insertBefore(sec.el, i < this.secs.length ? this.secs[i].el : null);
    this.secs.splice(i, 0, sec);
    this.byKey[id] = sec;
    this.dirty = true;
    return sec;
  };
  JobLog.prototype.newLine = function (stream, sec) {
    this.n += 1;
    var row = el('div', stream === 2 ? 'ln err' : stream === 3 ? 'ln sys' : 'ln');
    row.id = 'L' + this.index + '-' + this.n;
    var a = el('a', 'n', String(this.n));
    a.href = '#' + row.id;
    row.appendChild(a);
    var t = el('span', 't');
    row.appendChild(t);
    sec.el.appendChild(row);
    sec.lines += 1;
    this.inPage += 1;
    this.dirty = true;
    if (this.page.target === row.id) this.page.found = row;
    return t;
  };
  // Appends output of line d.l of step d.s of attempt d.a to that line's section: a newline
  // closes the open line; text opens one when none is open.
  JobLog.prototype.text = function (d) {
    // An attempt's first chunk, when the system's, is its preamble (the commands that recreate
    // the job): it goes before the attempt's first step, not under step 0's first line.
    var preamble = !this.chunked[d.a] && d.e === 3;
    this.chunked[d.a] = true;
    var sec = preamble ? this.section(d.a, -1, 0) : this.section(d.a, d.s, d.l), stream = d.e;
    if (this.curSec !== sec) { this.cur = null; this.curSec = sec; }
    var parts = d.t.split('\n');
    for (var i = 0; i < parts.length; i++) {
      if (i > 0) {
        if (!this.cur) this.newLine(stream, sec); // an empty line
        this.cur = null;
      }
      if (parts[i] === '') continue;
      if (!this.cur) this.cur = this.newLine(stream, sec);
      this.ansi.render(parts[i], this.cur);
    }
  };
  // The line's command heads its section, whether its output came first or not.
  JobLog.prototype.cmd = function (d) {
    var sec = this.section(d.a, d.s, d.l);
    if (sec.res) return;
    var row = el('div', 'cmd');
    row.appendChild(el('span', 'c', '$ ' + d.t));
    var res = el('span', 'res', 'running…');
    row.appendChild(res);
    sec.res = res;
    this.cmds[d.a + '-' + d.s + '-' + d.l] = res;
    sec.el.insertBefore(row, sec.el.firstChild);
    this.dirty = true;
  };
  JobLog.prototype.exit = function (d) {
    var key = d.a + '-' + d.s + '-' + d.l, res = this.cmds[key];
    if (!res) return;
    delete this.cmds[key];
    res.textContent = 'exit ' + d.c + ' · ' + duration(d.d);
    res.className = 'res ' + (d.c === 0 ? 'ok' : 'fail');
  };
  // A marker heading section (a, s, l) (a step's name: line -1; an attempt: step -1).
  JobLog.prototype.marker = function (cls, text, a, s, l) {
    var sec = this.section(a, s, l);
    if (sec.marked) return;
    sec.marked = true;
    sec.el.insertBefore(el('div', cls, text), sec.el.firstChild);
    this.dirty = true;
  };
  // After a frame's rendering: keeps at most MAX_LINES lines while following (the oldest
  // sections go first), and follows the bottom.
  JobLog.prototype.flush = function () {
    if (!this.dirty) return;
    this.dirty = false;
    if (this.inPage > MAX_LINES && this.follow) {
      var drop = this.inPage - Math.floor(MAX_LINES * 0.9);
      while (drop > 0 && this.secs.length) {
        var sec = this.secs[0];
        if (sec.lines <= drop) {
          drop -= sec.lines; this.inPage -= sec.lines;
          this.box.removeChild(sec.el);
          this.secs.shift();
          delete this.byKey[sec.k.join('-')];
          if (this.curSec === sec) { this.cur = null; this.curSec = null; }
          continue;
        }
        var rows = sec.el.querySelectorAll('.ln');
        for (var r = 0; r < drop; r++) sec.el.removeChild(rows[r]);
        sec.lines -= drop; this.inPage -= drop; drop = 0;
      }
      if (!this.notice) {
        this.notice = el('div', 'notice', 'Earlier lines are not kept in the page; the raw log has them all.');
        this.box.insertBefore(this.notice, this.box.firstChild);
      }
    }
    if (this.follow) this.box.scrollTop = this.box.scrollHeight;
  };

  // ---------------------------------------------------------------- build page
  function BuildPage(logs) {
    this.logs = logs;
    this.url = logs.getAttribute('data-events');
    this.summary = document.getElementById('summary');
    this.summaryUrl = this.summary.getAttribute('data-summary');
    this.jobs = {};
    this.queue = [];
    this.scheduled = false;
    this.lastId = -1;
    this.es = null;
    this.paused = false;
    this.throttled = false;
    this.ended = false;
    this.target = location.hash.slice(1);
    this.found = null;
    this.wantSummary = -1; this.summaryBusy = false; this.summaryTimer = null;
    var self = this;
    logs.querySelectorAll('details.joblog').forEach(function (d) {
      self.jobs[d.getAttribute('data-job')] = new JobLog(d, d.getAttribute('data-index'), self);
    });
    window.addEventListener('hashchange', function () { self.highlight(location.hash.slice(1)); });
    var full = /[?&]full=1/.test(location.search) || /^L/.test(this.target);
    this.open(0, full ? 0 : TAIL_BYTES);
  }
  BuildPage.prototype.job = function (id) {
    if (!this.jobs[id]) {
      // A job the page did not know (or the build's own messages): give it a log.
      var index = id === '' ? 'sys' : 'x' + Object.keys(this.jobs).length;
      var d = el('details', 'joblog');
      d.open = true;
      d.setAttribute('data-job', id);
      d.appendChild(el('summary', null, id === '' ? 'build' : id));
      var box = el('div', 'log'); box.tabIndex = 0; d.appendChild(box);
      var b = el('button', 'follow', '↓ follow'); b.type = 'button'; b.hidden = true; d.appendChild(b);
      var h = this.logs.querySelector('h2');
      this.logs.insertBefore(d, h.nextSibling);
      this.jobs[id] = new JobLog(d, index, this);
    }
    return this.jobs[id];
  };
  // Where to reopen the stream after the event with SSE id `id`.
  function resumeFrom(id) {
    return /\./.test(String(id)) ? id : parseInt(id, 10) + 1;
  }
  BuildPage.prototype.open = function (from, tail) {
    var self = this, es = new EventSource(this.url + '?from=' + from + (tail ? '&tail=' + tail : ''));
    this.es = es;
    var push = function (kind) {
      return function (e) {
        if (es !== self.es) return; // a stream closed for flow control
        // An offset, or `E.L` (the resume position) on a partitioned log.
        self.lastId = e.lastEventId;
        self.queue.push([kind, JSON.parse(e.data), parseInt(e.lastEventId, 10)]);
        if (self.queue.length > QUEUE_HIGH && !self.throttled) {
          // The page renders slower than the server sends (a long log): stop reading rather
          // than buffer it all; reopen from the next offset when the queue has drained.
          self.throttled = true;
          es.close();
        }
        self.schedule();
      };
    };
    ['log', 'cmd', 'exit', 'step', 'attempt', 'changed', 'end'].forEach(function (k) {
      es.addEventListener(k, push(k));
    });
    es.addEventListener('end', function () { self.ended = true; es.close(); });
    es.addEventListener('skip', function (e) { self.skipped(JSON.parse(e.data)); });
    es.addEventListener('error', function () {
      if (es.readyState === EventSource.CLOSED && !self.ended && !self.paused) {
        self.bar('The live log stopped (signed out or the server went away). Reload the page to retry.');
      }
    });
  };
  // The stream starts near the end of a long log: number lines from where it starts and say
  // what is not loaded.
  BuildPage.prototype.skipped = function (d) {
    var mb = (d.bytes / 1048576).toFixed(1);
    for (var id in d.lines) {
      var j = this.job(id);
      j.n = d.lines[id];
      var note = el('div', 'notice', j.n + ' earlier lines (of ' + mb + ' MiB of log) are not loaded: ');
      var raw = j.details.querySelector('a.raw');
      if (raw) { var r = el('a', null, 'raw log'); r.href = raw.href; note.appendChild(r); note.appendChild(document.createTextNode(' · ')); }
      var all = el('a', null, 'load all');
      all.href = '?full=1';
      note.appendChild(all);
      j.box.insertBefore(note, j.box.firstChild);
      j.notice = note;
    }
  };
  BuildPage.prototype.schedule = function () {
    if (this.scheduled) return;
    this.scheduled = true;
    var self = this, run = function () { if (self.scheduled) { self.scheduled = false; self.render(); } };
    requestAnimationFrame(run);
    setTimeout(run, 100); // rAF does not run in background tabs
  };
  BuildPage.prototype.render = function () {
    var start = performance.now(), touched = {}, moved = -1, i = 0;
    for (; i < this.queue.length; i++) {
      if ((i & 63) === 0 && performance.now() - start > FRAME_BUDGET_MS) break;
      var kind = this.queue[i][0], d = this.queue[i][1], id = this.queue[i][2];
      if (kind === 'log') {
        var j = this.job(d.j);
        j.text(d); touched[d.j] = j;
      } else if (kind === 'cmd') {
        j = this.job(d.j); j.cmd(d); touched[d.j] = j; moved = id;
      } else if (kind === 'exit') {
        j = this.job(d.j); j.exit(d); touched[d.j] = j; moved = id;
      } else if (kind === 'step') {
        j = this.job(d.j); j.marker('stepname', '▸ ' + d.n, d.a, d.s, -1); touched[d.j] = j;
      } else if (kind === 'attempt') {
        j = this.job(d.j);
        if (d.a > 1) { j.marker('attempt', '— attempt ' + d.a + ' —', d.a, -1, -1); touched[d.j] = j; }
        moved = id;
      } else if (kind === 'end') {
        this.logs.setAttribute('data-status', d.status);
        moved = id;
      } else {
        moved = id;
      }
    }
    this.queue.splice(0, i);
    if (this.throttled && this.queue.length < QUEUE_LOW && !this.paused && !this.ended) {
      this.throttled = false;
      this.open(resumeFrom(this.lastId));
    }
    for (var k in touched) touched[k].flush();
    if (this.found) { this.highlight(this.target); this.found = null; }
    if (moved >= 0) this.refreshSummary(moved);
    this.maybePause();
    if (this.queue.length) this.schedule();
  };
  // A reader who scrolled up keeps the page light: past MAX_LINES the stream pauses (it resumes
  // from the same offset, nothing lost) instead of growing the page without bound.
  BuildPage.prototype.maybePause = function () {
    if (this.paused || this.ended || !this.es) return;
    for (var k in this.jobs) {
      var j = this.jobs[k];
      if (!j.follow && j.inPage > MAX_LINES) {
        this.paused = true;
        this.es.close();
        this.es = null;
        this.bar('Paused at offset ' + this.lastId + ' to keep the page light. Scroll to the bottom or ', true);
        return;
      }
    }
  };
  BuildPage.prototype.resumeIfPaused = function () {
    if (!this.paused) return;
    this.paused = false;
    var b = this.logs.querySelector('.pausebar');
    if (b) b.remove();
    if (!this.throttled) this.open(resumeFrom(this.lastId));
    else this.schedule();
  };
  BuildPage.prototype.bar = function (text, resume) {
    var b = this.logs.querySelector('.pausebar') || el('div', 'pausebar');
    b.textContent = text;
    if (resume) {
      var self = this, btn = el('button', null, 'resume');
      btn.type = 'button';
      btn.addEventListener('click', function () { self.resumeIfPaused(); });
      b.appendChild(btn);
    }
    this.logs.insertBefore(b, this.logs.querySelector('h2').nextSibling);
  };
  BuildPage.prototype.highlight = function (id) {
    var old = document.querySelectorAll('.log .ln.hl');
    for (var i = 0; i < old.length; i++) old[i].classList.remove('hl');
    var row = id && document.getElementById(id);
    if (!row || !row.classList.contains('ln')) return;
    row.classList.add('hl');
    for (var k in this.jobs) {
      var j = this.jobs[k];
      if (j.box.contains(row)) { j.follow = false; j.btn.hidden = false; }
    }
    row.scrollIntoView({ block: 'center' });
  };
  // Re-fetches the summary once the read model has the offset `id` (debounced, one at a time).
  BuildPage.prototype.refreshSummary = function (id) {
    if (id > this.wantSummary) this.wantSummary = id;
    if (this.summaryBusy || this.summaryTimer) return;
    var self = this;
    this.summaryTimer = setTimeout(function () {
      self.summaryTimer = null;
      self.summaryBusy = true;
      var want = self.wantSummary;
      fetch(self.summaryUrl + '?after=' + want, { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html !== null && !self.past) self.summary.innerHTML = html;
        })
        .catch(function () {})
        .then(function () {
          self.summaryBusy = false;
          if (self.wantSummary > want) self.refreshSummary(self.wantSummary);
        });
    }, 200);
  };

  // ---------------------------------------------------------------- history slider
  function History(box, page) {
    var slider = document.getElementById('history-slider');
    var now = document.getElementById('history-now');
    var label = document.getElementById('history-label');
    var stepsUrl = box.getAttribute('data-steps'), atUrl = box.getAttribute('data-at');
    var steps = null, timer = null, shown = -1;
    function describe(i) {
      var s = steps[i], first = steps[0];
      return 'step ' + (i + 1) + ' of ' + steps.length + ' · ' + s.time + ' (+' +
        duration(s.time_us - first.time_us) + ') · ' + s.label + ' · offset ' + s.offset;
    }
    function show(i) {
      if (i === shown) return;
      shown = i;
      label.textContent = describe(i);
      page.past = true;
      now.disabled = false;
      fetch(atUrl + '?offset=' + steps[i].offset, { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          // Only the answer for the position still shown.
          if (html !== null && shown === i && page.past) page.summary.innerHTML = html;
        })
        .catch(function () {});
    }
    slider.addEventListener('input', function () {
      if (!steps) return;
      var i = parseInt(slider.value, 10);
      label.textContent = describe(i);
      clearTimeout(timer);
      timer = setTimeout(function () { show(i); }, 80);
    });
    now.addEventListener('click', function () {
      page.past = false; shown = -1; now.disabled = true;
      if (steps) { slider.value = String(steps.length - 1); label.textContent = 'now'; }
      fetch(page.summaryUrl, { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null && !page.past) page.summary.innerHTML = html; })
        .catch(function () {});
    });
    box.addEventListener('toggle', function () {
      if (!box.open || steps) return;
      fetch(stepsUrl, { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (list) {
          if (!list || !list.length) { label.textContent = 'no events yet'; return; }
          steps = list;
          slider.max = String(list.length - 1);
          slider.value = String(list.length - 1);
          slider.disabled = false;
          label.textContent = list.length + ' steps: move the slider to see the build as it was';
        })
        .catch(function () {});
    });
  }

  // ---------------------------------------------------------------- project page
  function BuildsTable(table) {
    var tbody = table.querySelector('tbody'), rowsUrl = table.getAttribute('data-rows');
    var want = '', busy = false, timer = null; // the last id seen (a resume token)
    function refresh() {
      if (busy || timer) return;
      timer = setTimeout(function () {
        timer = null; busy = true;
        var at = want;
        fetch(rowsUrl + '?after=' + at, { credentials: 'same-origin' })
          .then(function (r) { return r.ok ? r.text() : null; })
          .then(function (html) { if (html !== null) tbody.innerHTML = html; })
          .catch(function () {})
          .then(function () { busy = false; if (want !== at) refresh(); });
      }, 200);
    }
    var es = new EventSource(table.getAttribute('data-live'));
    es.addEventListener('changed', function (e) {
      // Ids only grow along a stream: the last one covers the others (on a partitioned log it
      // is a position per partition, `after` takes it as it is).
      want = e.lastEventId;
      refresh();
    });
  }

  function start() {
    var logs = document.getElementById('logs');
    if (logs) window.tributaryBuild = new BuildPage(logs);
    var history = document.getElementById('history');
    if (history && window.tributaryBuild) new History(history, window.tributaryBuild);
    var table = document.getElementById('builds');
    if (table && table.getAttribute('data-live')) new BuildsTable(table);
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
