import { IommufdError } from './errors.js';
import { MAX_OBJECT_ID } from './uapi.js';

/** Object kinds of a context, named as iommufd names them (IOMMUFD_OBJ_*). */
export type ObjectType = 'IOAS' | 'HWPT_PAGING' | 'HWPT_NESTED' | 'DEVICE' | 'ACCESS';

export interface ContextObject {
  readonly id: number;
  readonly type: ObjectType;
}

/**
 * One ID space per context, like iommufd's objects xarray (xa_alloc, XA_FLAGS_ALLOC1,
 * xa_limit_31b): the lowest free ID ≥ 1 is handed out, so a freed ID comes back first.
 *
 * Free IDs below `next` are kept as inclusive [lo, hi] runs, ascending: `next - 1` is always live,
 * so the runs are exactly the holes between live IDs, and their number never exceeds the number of
 * live objects, however large the IDs (a restored state may place one object at ID 2^31 - 1).
 */
export class ObjectTable<T extends ContextObject> {
  private readonly objects = new Map<number, T>();
  private readonly holes: [number, number][] = [];
  private next = 1;

  /** The ID the next add() will use, or 0 when the space is full. */
  peek(): number {
    if (this.holes.length > 0) return this.holes[0]![0];
    return this.next <= MAX_OBJECT_ID ? this.next : 0;
  }

  /** Takes the lowest free ID and stores the object `make` builds for it. */
  add<U extends T>(make: (id: number) => U): U {
    const hole = this.holes[0];
    let id: number;
    if (hole === undefined) id = this.next++;
    else {
      id = hole[0];
      if (hole[0] === hole[1]) this.holes.shift();
      else hole[0]++;
    }
    const obj = make(id);
    this.objects.set(id, obj);
    return obj;
  }

  /**
   * Stores the object `make` builds at a given free ID, leaving the allocator as if the IDs had been
   * handed out in the source's order (restore only: a saved context gets its IDs back). A used or
   * out-of-range ID is EEXIST / EINVAL.
   */
  addAt<U extends T>(id: number, make: (id: number) => U): U {
    if (!Number.isInteger(id) || id < 1 || id > MAX_OBJECT_ID) throw new IommufdError('EINVAL', `object ID ${id} is outside [1, ${MAX_OBJECT_ID}]`, 'id');
    if (this.objects.has(id)) throw new IommufdError('EEXIST', `object ID ${id} is in use`, 'id');
    if (id >= this.next) {
      if (id > this.next) this.holes.push([this.next, id - 1]);
      this.next = id + 1;
    } else {
      const i = this.holes.findIndex(([lo, hi]) => lo <= id && id <= hi);
      const [lo, hi] = this.holes[i]!;
      if (lo === hi) this.holes.splice(i, 1);
      else if (id === lo) this.holes[i]![0]++;
      else if (id === hi) this.holes[i]![1]--;
      else this.holes.splice(i, 1, [lo, id - 1], [id + 1, hi]);
    }
    const obj = make(id);
    this.objects.set(id, obj);
    return obj;
  }

  get(id: number): T | undefined {
    return this.objects.get(id);
  }

  remove(id: number): void {
    if (!this.objects.delete(id)) return;
    if (id === this.next - 1) {
      this.next--;
      // A hole that now reaches the top folds back into `next`.
      const top = this.holes[this.holes.length - 1];
      if (top !== undefined && top[1] === this.next - 1) {
        this.next = top[0];
        this.holes.pop();
      }
      return;
    }
    // Insert id, merging with the runs on either side.
    let i = 0;
    while (i < this.holes.length && this.holes[i]![1] < id) i++;
    const before = i > 0 ? this.holes[i - 1] : undefined;
    const after = this.holes[i];
    const joinBefore = before !== undefined && before[1] === id - 1;
    const joinAfter = after !== undefined && after[0] === id + 1;
    if (joinBefore && joinAfter) {
      before[1] = after[1];
      this.holes.splice(i, 1);
    } else if (joinBefore) before[1] = id;
    else if (joinAfter) after[0] = id;
    else this.holes.splice(i, 0, [id, id]);
  }

  get size(): number {
    return this.objects.size;
  }

  /** Objects in ID order. */
  list(): T[] {
    return [...this.objects.values()].sort((a, b) => a.id - b.id);
  }
}
