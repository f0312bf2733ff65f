/* Paced ChannelData sender for benchmarks/run.py: the traffic generator in C, so that the
 * generator is not what limits a measurement.
 *
 *   pacer RATE SECONDS INTERVAL_US FD [FD ...]
 *
 * Each FD is a UDP socket already connected to the TURN server with channel 0x4000
 * bound to an echo peer (run.py sets them up and passes them down).  Every INTERVAL_US
 * the sender thread sends the packets due at RATE packets/s, round robin over the
 * sockets: 160-byte ChannelData carrying a sequence number and the send time.  The
 * receiver thread reads the echoes (ChannelData back from the server) and records the
 * round-trip times.  Prints one JSON line: sent, received, rtt p50/p99 (ms), and the
 * generator's own CPU seconds.  Bounded: it stops SECONDS + 1 s after it started.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 160
#define MAX_FDS 4096

static int fds[MAX_FDS];
static int nfds;
static double rate, seconds;
static long interval_ns;
static volatile uint64_t sent;
static volatile int sending_done;
static uint64_t received;
static double *rtts;
static uint64_t rtt_cap;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *sender(void *arg) {
    (void)arg;
    unsigned char pkt[4 + PAYLOAD];
    memset(pkt, 0, sizeof pkt);
    pkt[0] = 0x40; pkt[1] = 0x00; pkt[2] = PAYLOAD >> 8; pkt[3] = PAYLOAD & 0xff;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    uint64_t n = 0;
    int i = 0;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= end) break;
        uint64_t due = (uint64_t)((double)(t - start) / 1e9 * rate);
        while (n < due) {
            uint64_t stamp = now_ns();
            memcpy(pkt + 4, &n, 8);
            memcpy(pkt + 12, &stamp, 8);
            send(fds[i], pkt, sizeof pkt, MSG_DONTWAIT); /* a failed send counts as lost */
            i = (i + 1) % nfds;
            n++;
        }
        sent = n;
        next.tv_nsec += interval_ns;
        while (next.tv_nsec >= 1000000000L) { next.tv_nsec -= 1000000000L; next.tv_sec++; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    sent = n;
    sending_done = 1;
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: pacer RATE SECONDS INTERVAL_US FD [FD ...]\n");
        return 2;
    }
    rate = atof(argv[1]);
    seconds = atof(argv[2]);
    interval_ns = atol(argv[3]) * 1000L;
    for (int a = 4; a < argc && nfds < MAX_FDS; a++) fds[nfds++] = atoi(argv[a]);
    if (rate <= 0 || seconds <= 0 || interval_ns <= 0 || nfds == 0) {
        fprintf(stderr, "pacer: bad arguments\n");
        return 2;
    }
    rtt_cap = (uint64_t)(rate * seconds) + 16;
    rtts = malloc(rtt_cap * sizeof(double));
    int ep = epoll_create1(0);
    for (int i = 0; i < nfds; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    pthread_t th;
    pthread_create(&th, NULL, sender, NULL);
    uint64_t start = now_ns(), stop = start + (uint64_t)((seconds + 1.0) * 1e9);
    unsigned char buf[2048];
    struct epoll_event events[64];
    for (;;) {
        uint64_t t = now_ns();
        if (t >= stop) break;
        if (sending_done && received >= sent) break;
        int n = epoll_wait(ep, events, 64, 10);
        for (int e = 0; e < n; e++) {
            for (;;) {
                ssize_t got = recv(events[e].data.fd, buf, sizeof buf, MSG_DONTWAIT);
                if (got < 0) break;
                if (got >= 20 && buf[0] >= 0x40 && buf[0] <= 0x7f) {
                    uint64_t stamp;
                    memcpy(&stamp, buf + 12, 8);
                    if (received < rtt_cap) rtts[received] = (double)(now_ns() - stamp) / 1e6;
                    received++;
                }
            }
        }
    }
    pthread_join(th, NULL);
    uint64_t have = received < rtt_cap ? received : rtt_cap;
    qsort(rtts, have, sizeof(double), cmp);
    double p50 = have ? rtts[have / 2] : -1, p99 = have ? rtts[(uint64_t)(have * 0.99)] : -1;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"sent\": %llu, \"received\": %llu, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"cpu_seconds\": %.3f}\n",
           (unsigned long long)sent, (unsigned long long)received, p50, p99, cpu);
    return 0;
}
