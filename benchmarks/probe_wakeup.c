// Wake-up lateness of a sleeping thread on a core shared with two busy threads, with the
// default time slice or a short one (sched_setattr sched_runtime, EEVDF on Linux >= 6.12).
// Why: the native intake's thread shares core 0 with TensorFlow and the Python loop, and asks
// for a 100 us slice so a new call is picked up promptly (src/adpredict/serving/_intake.cpp).
//
//   gcc -O2 -pthread benchmarks/probe_wakeup.c -o /tmp/probe_wakeup
//   taskset -c 0 /tmp/probe_wakeup 0     # default slice
//   taskset -c 0 /tmp/probe_wakeup 100   # 100 us slice
//
// Prints p50 / p99 / max of how late 2,000 sleeps of 1 ms wake up.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct sched_attr_v0 {
  uint32_t size, sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime, sched_deadline, sched_period;
};

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void* spin(void* arg) {
  (void)arg;
  volatile double x = 0;
  for (;;) x += 1;
  return NULL;
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  const int slice_us = argc > 1 ? atoi(argv[1]) : 0;
  pthread_t busy[2];
  for (int i = 0; i < 2; i++) pthread_create(&busy[i], NULL, spin, NULL);
  if (slice_us > 0) {
    struct sched_attr_v0 attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.sched_runtime = (uint64_t)slice_us * 1000;
    if (syscall(SYS_sched_setattr, 0, &attr, 0) != 0) perror("sched_setattr");
  }
  enum { N = 2000 };
  static double late_ms[N];
  for (int i = 0; i < N; i++) {
    const double want = now_s() + 0.001;
    const struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
    late_ms[i] = (now_s() - want) * 1e3;
  }
  qsort(late_ms, N, sizeof(double), by_value);
  printf("slice %d us: late p50 %.3f ms, p99 %.3f ms, max %.3f ms\n", slice_us, late_ms[N / 2],
         late_ms[N * 99 / 100], late_ms[N - 1]);
  return 0;
}
