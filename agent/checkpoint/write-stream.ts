/**
 * One pipelined write stream, whatever carries it (gRPC WriteStream, or a frame channel): batches
 * come in, acks go out in request order, and the first refused batch ends the stream.
 *
 * Acks leave in request order: each write's ack waits for the previous one. After a refused batch
 * the later ones are ignored, but the batches before it were applied and still get their acks (a
 * SYNC one may be waiting for a standby), ahead of the error: the writer then knows that exactly
 * its unacknowledged batches are missing, and may resend them (full disk).
 */
import { CheckpointService } from './checkpoint.service';
import { WriteAck, WriteRequest } from './messages';

export interface WriteStreamSink {
  ack(a: WriteAck): void;
  /** Ends the stream with the error's status; nothing is sent after it. */
  fail(err: unknown): void;
  /** Ends the stream cleanly (the writer ended its side and every ack went out). */
  end(): void;
}

export class WriteStream {
  private chain: Promise<void> = Promise.resolve();
  private refused = false;
  /** The transport itself failed: nothing more goes out on it. */
  private broken = false;
  /**
   * The error went out. A batch the store refused (a full disk) is refused in its place in the
   * order, when its turn comes; the store refuses what was handed over after it too.
   */
  private ended = false;

  constructor(
    private readonly svc: CheckpointService,
    private readonly peerVm: string | null,
    private readonly sink: WriteStreamSink,
  ) {}

  /** One batch; its ack (or the refusal that ends the stream) leaves after the earlier ones'. */
  request(req: WriteRequest): void {
    if (this.refused || this.broken) return;
    let pending: Promise<WriteAck>;
    try {
      pending = this.svc.write(req, this.peerVm);
    } catch (e) {
      this.refuse(e);
      return;
    }
    // Handled here at once: it may be refused before its turn in the chain comes.
    pending.catch(() => undefined);
    this.chain = this.chain.then(async () => {
      try {
        const ack = await pending;
        if (!this.broken && !this.ended) this.sink.ack(ack);
      } catch (e) {
        this.refused = true;
        this.fail(e);
      }
    });
  }

  /** Ends the stream with `err` once the acks of the batches before it went out. */
  refuse(err: unknown): void {
    if (this.refused || this.broken) return;
    this.refused = true;
    this.chain = this.chain.then(() => this.fail(err));
  }

  /** The writer ended its side: the stream ends once the outstanding acks went out. */
  end(): void {
    void this.chain.then(() => {
      if (!this.refused && !this.broken && !this.ended) this.sink.end();
    });
  }

  /** The transport failed or the writer went away. */
  broke(): void {
    this.broken = true;
  }

  private fail(err: unknown): void {
    if (this.ended) return;
    this.ended = true;
    if (!this.broken) this.sink.fail(err);
  }
}
