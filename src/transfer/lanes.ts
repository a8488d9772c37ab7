/**
 * At most `n` tasks at once; `run` waits for a free lane (so a producer never gets far ahead of
 * the transfers, and memory stays bounded), `drain` waits for all and throws the first failure.
 */
export class Lanes {
  private readonly running = new Set<Promise<void>>();
  private failure: { err: unknown } | undefined;

  constructor(private readonly n: number) {}

  async run(task: () => Promise<void>): Promise<void> {
    this.check();
    while (this.running.size >= this.n) await Promise.race(this.running);
    this.check();
    const p: Promise<void> = task()
      .catch((err: unknown) => {
        this.failure ??= { err };
      })
      .finally(() => this.running.delete(p));
    this.running.add(p);
  }

  async drain(): Promise<void> {
    await Promise.all(this.running);
    this.check();
  }

  private check(): void {
    if (this.failure) throw this.failure.err;
  }
}
