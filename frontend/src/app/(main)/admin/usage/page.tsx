"use client";

import { useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { DataTable, LoadState, Name, Td, useLoad } from "@/components/ui";
import { api, unwrap } from "@/lib/api";
import { budgetClass, estimateNote, hours, money, monthOf, monthRange, percent, type UsageReport } from "@/lib/usage";

const GROUPINGS = { user: "User", group: "Group", application: "Application" } as const;
type Grouping = keyof typeof GROUPINGS;
const BUDGET_WORDS = { ok: "", warning: "over 80 % of budget", exceeded: "budget used up" } as const;

/** Core-hours per day as bars: plain SVG, no chart library (the UI's JavaScript budget is small). */
function DayChart({ report }: { report: UsageReport }) {
  const rows = report.rows;
  const top = Math.max(...rows.map((row) => row.core_hours), 0);
  const width = 100 / Math.max(rows.length, 1);
  return (
    <figure className="chart">
      <svg viewBox="0 0 100 40" preserveAspectRatio="none" role="img" aria-label={`Core-hours per day, highest ${hours(top)}`}>
        {rows.map((row, index) => {
          const height = top > 0 ? (row.core_hours / top) * 38 : 0;
          return (
            <rect key={row.key} x={index * width + width * 0.1} y={40 - height} width={width * 0.8} height={height} className="bar">
              <title>{`${row.label}: ${hours(row.core_hours)} core-hours, ${money(row.cost, report.currency)}`}</title>
            </rect>
          );
        })}
      </svg>
      <figcaption className="small muted">
        Core-hours per day{top > 0 ? ` (highest: ${hours(top)})` : ": none this month"}
      </figcaption>
    </figure>
  );
}

/** JSON (the route also answers CSV, so its generated type is loose). */
async function report(range: { from: string; to: string }, groupBy: Grouping | "day"): Promise<UsageReport> {
  const answer = await unwrap(api.GET("/api/v1/usage", { params: { query: { ...range, group_by: groupBy } } }));
  return answer as UsageReport;
}

export default function UsagePage() {
  const [month, setMonth] = useState(() => monthOf(new Date()));
  const [groupBy, setGroupBy] = useState<Grouping>("user");
  const range = monthRange(month);
  const table = useLoad(() => report(range, groupBy), [month, groupBy]);
  const days = useLoad(() => report(range, "day"), [month]);
  const shown = table.data;
  const csv = `/api/v1/usage?${new URLSearchParams({ ...range, group_by: groupBy, format: "csv" })}`;
  const flagged = (shown?.budgets ?? []).filter((budget) => budget.state !== "ok");
  return (
    <>
      <h1>Usage and cost</h1>
      <AdminNav />
      <form className="toolbar" onSubmit={(event) => event.preventDefault()}>
        <label>
          Month{" "}
          <input type="month" value={month} required onChange={(event) => event.target.value && setMonth(event.target.value)} />
        </label>
        <label>
          By{" "}
          <select value={groupBy} onChange={(event) => setGroupBy(event.target.value as Grouping)}>
            {Object.entries(GROUPINGS).map(([value, label]) => (
              <option key={value} value={value}>
                {label.toLowerCase()}
              </option>
            ))}
          </select>
        </label>
        <a className="button" href={csv} download>
          Download CSV
        </a>
      </form>
      {shown ? <p className="small muted">{estimateNote(shown)}</p> : null}
      {flagged.map((budget) => (
        <p key={budget.id} className={budgetClass(budget)}>
          {/* the message speaks to the budget's user ("your budget"): the admin gets whose it is */}
          {budget.scope} {budget.label}: {percent(budget.percent)} of its monthly {budget.amount}{" "}
          {budget.unit === "currency" ? budget.currency : "core-hours"} used
          {budget.state === "exceeded" ? (budget.hard ? ", new starts refused and running environments stopped" : ", new starts refused") : ""}
        </p>
      ))}
      {days.data ? <DayChart report={days.data} /> : null}
      <LoadState load={table} what="Adding up usage" empty={shown?.rows.length === 0}>
        Nothing used in {month}.
      </LoadState>
      {shown && shown.rows.length > 0 ? (
        <DataTable
          caption={`Usage in ${month} by ${groupBy}`}
          columns={[GROUPINGS[groupBy], "Environment hours", "Core-hours", "Storage GB-months", "Estimated cost", "Budget"]}
        >
          {shown.rows.map((row) => (
            <tr key={row.key} data-row={row.key}>
              <th scope="row">
                <Name text={row.label} />
              </th>
              <Td label="Environment hours">{hours(row.environment_hours)}</Td>
              <Td label="Core-hours">{hours(row.core_hours)}</Td>
              <Td label="Storage GB-months">{row.storage_gb_months.toFixed(3)}</Td>
              <Td label="Estimated cost">{money(row.cost, shown.currency)}</Td>
              <Td label="Budget">
                {row.budget_state && row.budget_state !== "ok" ? (
                  <span className={`badge badge-${row.budget_state}`}>{BUDGET_WORDS[row.budget_state]}</span>
                ) : (
                  ""
                )}
              </Td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      {shown?.totals ? (
        <p>
          Total: {hours(shown.totals.core_hours)} core-hours, {shown.totals.storage_gb_months.toFixed(3)} GB-months,{" "}
          {money(shown.totals.cost + shown.cluster_fee, shown.currency)}
          {shown.cluster_fee > 0 ? ` (with the cluster fee, ${money(shown.cluster_fee, shown.currency)})` : ""}.
        </p>
      ) : null}
    </>
  );
}
