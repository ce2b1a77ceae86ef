/** Collects the demo's story: human lines as it goes, or one JSON document at the end. */
export interface NarrativeEvent {
  readonly act: string;
  readonly text: string;
  readonly data?: Record<string, unknown>;
}

export class Narrative {
  readonly events: NarrativeEvent[] = [];
  private act = '';

  constructor(
    private readonly json: boolean,
    private readonly write: (line: string) => void = (line) => process.stdout.write(`${line}\n`),
  ) {}

  section(title: string): void {
    this.act = title;
    if (!this.json) this.write(`\n== ${title}`);
  }

  say(text: string, data?: Record<string, unknown>): void {
    this.events.push({ act: this.act, text, ...(data !== undefined ? { data } : {}) });
    if (!this.json) this.write(`   ${text}`);
  }

  finish(summary: Record<string, unknown>): void {
    if (this.json) this.write(JSON.stringify({ events: this.events, summary }, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v)));
    else this.write(`\n${Object.entries(summary).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`).join('\n')}`);
  }
}
