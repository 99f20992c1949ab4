/** @odoo-module **/
// Live database connection dashboard (Settings > Technical > Database Connections).
// One code base for Odoo 16.0-19.0: OWL 2 only, and a plain fetch() of a JSON-RPC
// POST instead of the rpc service/function, whose API differs between series.
import { Component, onMounted, onWillStart, onWillUnmount, useState, xml } from "@odoo/owl";
import { registry } from "@web/core/registry";

const ROUTE = "/db_pooling/dashboard_data";
const REFRESH_MS = 3000;
const CHART = { width: 720, height: 160, pad: 30 };
const SERIES = [
    // [history field index, label, colour]
    [1, "held", "#875a7b"],
    [2, "in use", "#017e84"],
    [3, "idle", "#8d8d8d"],
    [4, "waiting", "#d9534f"],
];

export async function callJsonRoute(url, params = {}) {
    const response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", method: "call", id: Date.now(), params }),
    });
    if (response.status === 404) {
        // Odoo serves a request without its database when it cannot open it, and then
        // knows no route that needs a logged-in user.
        throw new Error(
            "Odoo answered without the database (HTTP 404): the database server is probably " +
            "down, and Odoo dropped the database from this session: log in again once it is back"
        );
    }
    if (!response.ok) {
        throw new Error(`the server answered HTTP ${response.status} ${response.statusText}`);
    }
    const body = await response.json();
    if (body.error) {
        const data = body.error.data || {};
        let message = data.message || body.error.message || "unknown server error";
        if ((data.name || "").includes("SessionExpired")) {
            // Odoo drops the database from the session when it cannot open it.
            message += " (Odoo could not use the database and dropped it from this session: " +
                "if the database server was down, log in again once it is back)";
        }
        throw new Error(message);
    }
    return body.result;
}

function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString();
}

export class DbPoolingDashboard extends Component {
    setup() {
        this.state = useState({ data: null, error: null, failedAt: null, refreshes: 0 });
        onWillStart(() => this.refresh());
        onMounted(() => {
            this.timer = setInterval(() => this.refresh(), REFRESH_MS);
        });
        onWillUnmount(() => clearInterval(this.timer));
    }

    async refresh() {
        try {
            this.state.data = await callJsonRoute(ROUTE);
            this.state.error = null;
            this.state.refreshes++;
        } catch (error) {
            // Keep the last figures on screen and say what failed; retry on the next tick.
            this.state.error = error.message || String(error);
            this.state.failedAt = Date.now() / 1000;
        }
    }

    get updatedAt() {
        return this.state.data ? clock(this.state.data.time) : "";
    }

    get failedAt() {
        return this.state.failedAt ? clock(this.state.failedAt) : "";
    }

    clockOf(seconds) {
        return clock(seconds);
    }

    fmt(value) {
        return value === null || value === undefined ? "–" : String(value);
    }

    age(seconds) {
        return seconds === null || seconds === undefined ? "" : `${seconds.toFixed(1)} s`;
    }

    tlsText(tls) {
        if (!tls || tls.encrypted === null) {
            return (tls && tls.note) || "unknown";
        }
        if (!tls.encrypted) {
            return `not encrypted (sslmode ${tls.sslmode})`;
        }
        return `${tls.protocol} ${tls.cipher} (sslmode ${tls.sslmode})`;
    }

    get settingsList() {
        const settings = (this.state.data && this.state.data.settings) || {};
        return Object.keys(settings).map((name) => ({ name, value: this.fmt(settings[name]) }));
    }

    get chart() {
        const data = this.state.data;
        const history = (data && data.history) || [];
        const { width, height, pad } = CHART;
        const now = data ? data.time * 1000 : Date.now();
        const start = now - 3600 * 1000;
        const budget = (data && data.totals.budget) || 0;
        let top = budget;
        for (const sample of history) {
            for (const [field] of SERIES) {
                top = Math.max(top, sample[field]);
            }
        }
        top = Math.max(top, 1);
        const x = (t) => pad + ((t - start) / (now - start)) * (width - 2 * pad);
        const y = (v) => height - pad + 10 - (v / top) * (height - pad - 10);
        const lines = SERIES.map(([field, label, color]) => ({
            label,
            color,
            points: history.map((s) => `${x(s[0]).toFixed(1)},${y(s[field]).toFixed(1)}`).join(" "),
        }));
        return {
            width,
            height,
            lines,
            samples: history.length,
            budgetY: budget ? y(budget).toFixed(1) : null,
            top,
            topY: y(top).toFixed(1),
            baseY: y(0).toFixed(1),
            left: pad,
            right: width - pad,
        };
    }
}

DbPoolingDashboard.template = xml`
<div class="o_db_pooling_dashboard o_action h-100 overflow-auto p-3">
  <h2>Database Connections</h2>
  <div class="mb-2">
    <t t-if="state.data">
      <span t-if="state.data.active and state.data.server_wide" class="badge bg-success text-white o_dbp_active">pooling active (server-wide)</span>
      <span t-else="" class="badge bg-danger text-white o_dbp_active">pooling NOT active: load db_pooling server-wide (server_wide_modules) and restart Odoo</span>
      <span class="ms-2 text-muted">Odoo <t t-esc="state.data.series"/>, answered by process <t t-esc="state.data.pid"/> at <span class="o_dbp_updated" t-esc="updatedAt"/>, refreshed every 3 s</span>
      <span class="d-none o_dbp_refreshes" t-esc="state.refreshes"/>
    </t>
  </div>
  <div t-if="state.error" class="alert alert-danger o_dbp_error" role="alert">
    Could not refresh at <t t-esc="failedAt"/>: <t t-esc="state.error"/>.
    <t t-if="state.data">The figures below are from <t t-esc="updatedAt"/>.</t>
    If the database server is down, Odoo cannot serve this page; <code>odoo-pool top</code>
    on the Odoo host reads the shared state without it.
  </div>
  <t t-if="state.data">
    <div t-foreach="state.data.errors" t-as="message" t-key="message_index" class="alert alert-warning o_dbp_warning" role="alert">
      <t t-esc="message"/>
    </div>
    <div class="d-flex flex-wrap gap-2 mb-3">
      <t t-foreach="[['held', 'held'], ['in_use', 'in use'], ['idle', 'idle'], ['long_lived', 'long-lived (LISTEN)'], ['waiting', 'waiting'], ['budget', 'budget'], ['max_connections', 'server max_connections']]" t-as="card" t-key="card[0]">
        <div class="card text-center" style="min-width: 8rem">
          <div class="card-body p-2">
            <div class="fs-3 fw-bold" t-att-data-figure="card[0]" t-esc="fmt(state.data.totals[card[0]])"/>
            <div class="text-muted small" t-esc="card[1]"/>
          </div>
        </div>
      </t>
    </div>
    <h4>Last hour</h4>
    <t t-set="c" t-value="chart"/>
    <svg class="o_dbp_chart mb-1 d-block" t-attf-style="width: {{c.width}}px; height: {{c.height}}px; min-height: {{c.height}}px" t-att-width="c.width" t-att-height="c.height" t-att-viewBox="'0 0 ' + c.width + ' ' + c.height">
      <line t-att-x1="c.left" t-att-x2="c.right" t-att-y1="c.baseY" t-att-y2="c.baseY" stroke="#ccc"/>
      <text t-att-x="c.left - 4" t-att-y="c.baseY" font-size="10" text-anchor="end">0</text>
      <text t-att-x="c.left - 4" t-att-y="c.topY" font-size="10" text-anchor="end" t-esc="c.top"/>
      <t t-if="c.budgetY">
        <line t-att-x1="c.left" t-att-x2="c.right" t-att-y1="c.budgetY" t-att-y2="c.budgetY" stroke="#f0ad4e" stroke-dasharray="4 3"/>
        <text t-att-x="c.right" t-att-y="c.budgetY - 3" font-size="10" text-anchor="end">budget</text>
      </t>
      <polyline t-foreach="c.lines" t-as="line" t-key="line.label" fill="none" stroke-width="1.5" t-att-stroke="line.color" t-att-points="line.points"/>
      <text t-att-x="c.left" t-att-y="c.height - 4" font-size="10">-60 min</text>
      <text t-att-x="c.right" t-att-y="c.height - 4" font-size="10" text-anchor="end">now</text>
    </svg>
    <div class="small mb-3">
      <t t-foreach="c.lines" t-as="line" t-key="line.label"><span class="me-3"><span t-attf-style="color: {{line.color}}">&#9632;</span> <t t-esc="line.label"/></span></t>
      <span class="text-muted"><t t-esc="c.samples"/> samples, one per 5 s</span>
    </div>

    <h4>Processes</h4>
    <table class="table table-sm o_dbp_workers">
      <thead><tr><th>pid</th><th>role</th><th>in use</th><th>idle</th><th>long-lived</th><th>held</th><th>borrows</th><th>waits</th><th>timeouts</th><th>longest current borrow</th></tr></thead>
      <tbody>
        <tr t-foreach="state.data.workers" t-as="w" t-key="w.pid" t-att-data-pid="w.pid">
          <td t-esc="w.pid"/><td t-esc="w.role"/><td t-esc="w.in_use"/><td t-esc="w.idle"/><td t-esc="w.long_lived"/><td t-esc="w.held"/>
          <td t-esc="w.borrows"/><td t-esc="w.waits"/><td t-esc="w.timeouts"/>
          <td class="o_dbp_longest"><t t-if="w.longest"><t t-esc="age(w.longest.age)"/> on <b t-esc="w.longest.database"/> at <code t-esc="w.longest.site"/></t></td>
        </tr>
      </tbody>
    </table>

    <h4>Servers</h4>
    <table class="table table-sm o_dbp_servers">
      <thead><tr><th>name</th><th>kind</th><th>host:port</th><th>health</th><th>our connections</th><th>reads</th><th>writes</th><th>fallbacks</th><th>lag</th><th>TLS</th></tr></thead>
      <tbody>
        <tr t-foreach="state.data.servers" t-as="s" t-key="s_index">
          <td t-esc="s.name"/><td t-esc="s.kind"/><td><t t-esc="s.host"/>:<t t-esc="s.port"/></td>
          <td><t t-esc="s.health"/><t t-if="s.banned_until"> until <t t-esc="clockOf(s.banned_until)"/></t></td>
          <td t-esc="fmt(s.connections)"/><td t-esc="fmt(s.reads)"/><td t-esc="fmt(s.writes)"/><td t-esc="fmt(s.fallbacks)"/>
          <td><t t-if="s.lag_seconds !== undefined and s.lag_seconds !== null"><t t-esc="s.lag_seconds"/> s</t><t t-if="s.lag_bytes"> / <t t-esc="s.lag_bytes"/> bytes</t></td>
          <td t-esc="tlsText(s.tls)"/>
        </tr>
      </tbody>
    </table>

    <h4>Server connections by database (pg_stat_activity)</h4>
    <table class="table table-sm o_dbp_databases">
      <thead><tr><th>database</th><th>this Odoo instance</th><th>others</th></tr></thead>
      <tbody>
        <tr t-foreach="state.data.databases" t-as="d" t-key="d.database"><td t-esc="d.database or '(none)'"/><td t-esc="d.ours"/><td t-esc="d.others"/></tr>
      </tbody>
    </table>
    <details class="mb-3">
      <summary>All client connections by database, state and application name</summary>
      <table class="table table-sm o_dbp_activity">
        <thead><tr><th>database</th><th>application_name</th><th>user</th><th>state</th><th>count</th><th>ours</th></tr></thead>
        <tbody>
          <tr t-foreach="state.data.activity" t-as="a" t-key="a_index">
            <td t-esc="a.database"/><td t-esc="a.application_name"/><td t-esc="a.user"/><td t-esc="a.state"/><td t-esc="a.count"/><td t-esc="a.ours ? 'yes' : ''"/>
          </tr>
        </tbody>
      </table>
    </details>

    <details class="mb-3">
      <summary>Effective settings (odoo.conf, secrets masked)</summary>
      <table class="table table-sm o_dbp_settings">
        <tbody>
          <tr t-foreach="settingsList" t-as="o" t-key="o.name"><td><code t-esc="o.name"/></td><td t-esc="o.value"/></tr>
        </tbody>
      </table>
    </details>
  </t>
  <div t-elif="!state.error" class="text-muted">Loading…</div>
</div>`;

registry.category("actions").add("db_pooling.dashboard", DbPoolingDashboard);
