// Usage reports as the UI shows them: amounts are estimates from list prices, never a bill.
import type { Schemas } from "@/lib/api";

export type UsageReport = Schemas["UsageReport"];
export type UsageRow = Schemas["UsageRow"];
export type Budget = Schemas["BudgetStatusOut"];

/** "2026-11" of a date (UTC). */
export function monthOf(date: Date): string {
  return date.toISOString().slice(0, 7);
}

/** [first day, first day of the next month) of "2026-11", as the API's from/to dates. */
export function monthRange(month: string): { from: string; to: string } {
  const [year, number] = month.split("-").map(Number);
  const next = number === 12 ? `${year + 1}-01` : `${year}-${String(number + 1).padStart(2, "0")}`;
  return { from: `${month}-01`, to: `${next}-01` };
}

export function money(amount: number, currency: string): string {
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(amount);
  } catch {
    return `${amount.toFixed(2)} ${currency}`; // a currency code the browser does not know
  }
}

export function hours(value: number): string {
  if (value < 1) return value.toFixed(2);
  return value < 10 ? value.toFixed(1) : Math.round(value).toLocaleString();
}

/** "80 %", or ">999 %" far past a budget (the API's figure stops at 1000). */
export function percent(value: number): string {
  return value >= 999.5 ? ">999 %" : `${Math.round(value)} %`;
}

/** A budget's box: red once used up (new starts are refused), yellow from 80 %. */
export function budgetClass(budget: Budget): "error" | "warning" {
  return budget.state === "exceeded" ? "error" : "warning";
}

/** What a used-up budget does, as one sentence; "" below 100 %. */
export function budgetConsequence(budget: Budget): string {
  if (budget.state !== "exceeded") return "";
  return budget.hard
    ? "New environments cannot start and running ones are stopped until an administrator raises it or the month ends."
    : "New environments cannot start until an administrator raises it or the month ends.";
}

/** The line every amount carries: whose list prices, read when ("Estimates from aws list prices read on …"). */
export function estimateNote(report: UsageReport): string {
  return `${report.estimate.charAt(0).toUpperCase()}${report.estimate.slice(1)}.`;
}
