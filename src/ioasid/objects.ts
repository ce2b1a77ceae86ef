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
 */
export class ObjectTable<T extends ContextObject> {
  private readonly objects = new Map<number, T>();
  /** Freed IDs below `next`, kept sorted descending so pop() yields the lowest. */
  private readonly freed: number[] = [];
  private next = 1;

  /** The ID the next add() will use, or 0 when the space is full. */
  peek(): number {
    if (this.freed.length > 0) return this.freed[this.freed.length - 1]!;
    return this.next <= MAX_OBJECT_ID ? this.next : 0;
  }

  /** Takes the lowest free ID and stores the object `make` builds for it. */
  add<U extends T>(make: (id: number) => U): U {
    const id = this.freed.pop() ?? this.next++;
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
      // Fold freed IDs that now sit at the top back into `next`.
      while (this.freed.length > 0 && this.freed[0] === this.next - 1) {
        this.freed.shift();
        this.next--;
      }
    } else {
      let i = this.freed.length;
      while (i > 0 && this.freed[i - 1]! < id) i--;
      this.freed.splice(i, 0, id);
    }
  }

  get size(): number {
    return this.objects.size;
  }

  /** Objects in ID order. */
  list(): T[] {
    return [...this.objects.values()].sort((a, b) => a.id - b.id);
  }
}
