#!/usr/bin/env python3
"""Where a daemon's sampled CPU time went, from bench/flamegraph.sh's folded
stacks: the share of the time whose call stack passes through each of a few
parts of the write path (a stack can pass through several: the shares do not
add up to 100 %).

    bench/profile-shares.py FILE.folded.gz [FILE.folded.gz ...]
"""
import gzip
import re
import sys

PARTS = [
    ("client socket in (requests)", r"unix_stream_recvmsg"),
    ("client socket out (replies)", r"unix_stream_sendmsg"),
    ("io_uring submissions", r"__do_sys_io_uring_enter"),
    ("journal appends (pwritev)", r"do_pwritev"),
    ("QUIC datagrams out", r"udp_sendmsg"),
    ("QUIC datagrams in", r"udp_recvmsg"),
    ("quinn", r"quinn_proto::"),
    ("AES-GCM", r"aes_gcm"),
    ("memcpy in user space", r"__memmove|__memcpy"),
    ("malloc and free", r"(^|;)(malloc|_int_malloc|_int_free|cfree|free|unlink_chunk[^;]*|malloc_consolidate)(;|$)"),
    ("waiting for events (epoll_wait)", r"do_epoll_wait"),
    ("futex", r"do_futex"),
    ("switching in (finish_task_switch)", r"finish_task_switch"),
    ("io_uring worker threads", r"^iou-wrk"),
]


def shares(path):
    total = 0
    sums = [0] * len(PARTS)
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            count = int(count)
            total += count
            for i, (_, pattern) in enumerate(PARTS):
                if re.search(pattern, stack):
                    sums[i] += count
    return total, sums


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        total, sums = shares(path)
        print(f"{path}: {total / 1e9:.2f} s of CPU sampled")
        for (name, _), s in zip(PARTS, sums):
            print(f"  {100 * s / max(total, 1):5.1f} %  {name}")


if __name__ == "__main__":
    main()
