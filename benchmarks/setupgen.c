/* Allocation setups in C for benchmarks/run.py: the setup generator is not what limits
 * (or shares the cores with) the server it measures.  The Python generator
 * (loadgen.py) spends 100-160 µs of CPU per setup, 40-50 % of a core at the rates
 * measured, on a machine of two cores; this one a few µs.
 *
 *   setupgen SERVER_IP SERVER_PORT PEER_IP PEER_PORT WINDOW TIMEOUT_S < clients
 *
 * stdin: one client per line, "SOURCE_IP USERNAME KEY_HEX" (the long-term key,
 * MD5(username:realm:password), computed by run.py).  Each client gets its own UDP
 * socket bound to SOURCE_IP and runs a full setup: Allocate (answered 401 with REALM
 * and NONCE), Allocate with credentials, CreatePermission and ChannelBind (channel
 * 0x4000) for the peer.  WINDOW clients are in flight at once; a request unanswered
 * for 1 s is sent again as it was (RFC 8489 §6.2.1); a 438 answer gives a new nonce and
 * the request is sent again; any other error answer fails the client.  Every socket
 * stays open until the end (the server keeps the allocations until they expire).
 * Prints one JSON line: ready, failed, seconds (first request to last answer) and the
 * generator's own CPU seconds.  Bounded: it stops after TIMEOUT_S.  IPv4 only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 100000
#define MAX_TEXT 256
#define COOKIE 0x2112A442u

enum { CHALLENGE, ALLOCATE, PERMISSION, BIND, READY, FAILED };
static const uint16_t METHOD[] = {0x0003, 0x0003, 0x0008, 0x0009};

struct client {
    int fd;
    int state;
    uint8_t tid[12];
    uint8_t last[1024];
    int last_len;
    double sent_at;
    char user[MAX_TEXT];
    uint8_t key[16];
    char realm[MAX_TEXT];
    char nonce[MAX_TEXT];
};

static struct client *clients;
static int nclients;
static struct sockaddr_in server, peer;
static uint64_t rng;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t next_random(void) { /* xorshift64*: transaction ids, not secrets */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
}

static int put_attr(uint8_t *p, uint16_t type, const void *value, int len) {
    p[0] = type >> 8; p[1] = type & 0xff; p[2] = len >> 8; p[3] = len & 0xff;
    memcpy(p + 4, value, len);
    int padded = (len + 3) & ~3;
    memset(p + 4 + len, 0, padded - len);
    return 4 + padded;
}

static int put_xor_peer(uint8_t *p) {
    uint8_t v[8];
    uint16_t port = ntohs(peer.sin_port) ^ (COOKIE >> 16);
    uint32_t ip = ntohl(peer.sin_addr.s_addr) ^ COOKIE;
    v[0] = 0; v[1] = 1; v[2] = port >> 8; v[3] = port & 0xff;
    v[4] = ip >> 24; v[5] = ip >> 16; v[6] = ip >> 8; v[7] = ip;
    return put_attr(p, 0x0012, v, 8);
}

/* The request of the client's current step, with a fresh transaction id. */
static void send_step(struct client *c) {
    uint8_t *m = c->last;
    int n = 20;
    uint64_t r1 = next_random(), r2 = next_random();
    memcpy(c->tid, &r1, 8);
    memcpy(c->tid + 8, &r2, 4);
    if (c->state == CHALLENGE || c->state == ALLOCATE) {
        uint8_t udp[4] = {17, 0, 0, 0};
        n += put_attr(m + n, 0x0019, udp, 4); /* REQUESTED-TRANSPORT */
    } else if (c->state == PERMISSION) {
        n += put_xor_peer(m + n);
    } else {
        uint8_t channel[4] = {0x40, 0x00, 0, 0};
        n += put_attr(m + n, 0x000C, channel, 4); /* CHANNEL-NUMBER */
        n += put_xor_peer(m + n);
    }
    if (c->state != CHALLENGE) {
        n += put_attr(m + n, 0x0006, c->user, (int)strlen(c->user));
        n += put_attr(m + n, 0x0014, c->realm, (int)strlen(c->realm));
        n += put_attr(m + n, 0x0015, c->nonce, (int)strlen(c->nonce));
    }
    uint16_t type = METHOD[c->state];
    m[0] = type >> 8; m[1] = type & 0xff;
    uint32_t cookie = htonl(COOKIE);
    memcpy(m + 4, &cookie, 4);
    memcpy(m + 8, c->tid, 12);
    if (c->state != CHALLENGE) { /* RFC 8489 §14.5: length up to MESSAGE-INTEGRITY */
        int length = n - 20 + 24;
        m[2] = length >> 8; m[3] = length & 0xff;
        unsigned int maclen = 0;
        uint8_t mac[EVP_MAX_MD_SIZE];
        HMAC(EVP_sha1(), c->key, 16, m, n, mac, &maclen);
        n += put_attr(m + n, 0x0008, mac, 20);
    }
    m[2] = (n - 20) >> 8; m[3] = (n - 20) & 0xff;
    c->last_len = n;
    send(c->fd, m, n, 0);
    c->sent_at = now_s();
}

/* An attribute's value as text (REALM, NONCE); 0 when absent or too long. */
static int find_text(const uint8_t *m, int len, uint16_t want, char *out) {
    int off = 20;
    while (off + 4 <= len) {
        uint16_t type = m[off] << 8 | m[off + 1];
        int alen = m[off + 2] << 8 | m[off + 3];
        if (off + 4 + alen > len) return 0;
        if (type == want) {
            if (alen >= MAX_TEXT) return 0;
            memcpy(out, m + off + 4, alen);
            out[alen] = 0;
            return 1;
        }
        off += 4 + ((alen + 3) & ~3);
    }
    return 0;
}

static int error_code(const uint8_t *m, int len) {
    int off = 20;
    while (off + 8 <= len) {
        uint16_t type = m[off] << 8 | m[off + 1];
        int alen = m[off + 2] << 8 | m[off + 3];
        if (type == 0x0009 && alen >= 4 && off + 8 <= len)
            return (m[off + 6] & 7) * 100 + m[off + 7];
        off += 4 + ((alen + 3) & ~3);
    }
    return 0;
}

/* One answer for client c: the next step, or the end of this client. */
static void on_answer(struct client *c, const uint8_t *m, int len, int *ready, int *failed) {
    if (len < 20 || memcmp(m + 8, c->tid, 12) != 0) return;
    uint16_t type = m[0] << 8 | m[1];
    uint16_t method = METHOD[c->state];
    if (type == (0x0100 | method)) {
        if (c->state == CHALLENGE) { c->state = FAILED; (*failed)++; return; }
        if (++c->state == READY) { (*ready)++; return; }
        send_step(c);
        return;
    }
    if (type != (0x0110 | method)) return;
    int code = error_code(m, len);
    if (code == 401 && c->state == CHALLENGE) {
        if (!find_text(m, len, 0x0014, c->realm) || !find_text(m, len, 0x0015, c->nonce)) {
            c->state = FAILED; (*failed)++; return;
        }
        c->state = ALLOCATE;
        send_step(c);
    } else if (code == 438 && c->state != CHALLENGE && find_text(m, len, 0x0015, c->nonce)) {
        send_step(c);
    } else {
        c->state = FAILED;
        (*failed)++;
    }
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s SERVER_IP SERVER_PORT PEER_IP PEER_PORT WINDOW TIMEOUT_S\n",
                argv[0]);
        return 2;
    }
    server.sin_family = peer.sin_family = AF_INET;
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1 ||
        inet_pton(AF_INET, argv[3], &peer.sin_addr) != 1) {
        fprintf(stderr, "IPv4 addresses only\n");
        return 2;
    }
    server.sin_port = htons((uint16_t)atoi(argv[2]));
    peer.sin_port = htons((uint16_t)atoi(argv[4]));
    int window = atoi(argv[5]);
    double timeout = atof(argv[6]);
    if (window < 1) window = 1;
    if (getrandom(&rng, sizeof rng, 0) != sizeof rng || rng == 0) rng = 88172645463325252ull;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    clients = calloc(MAX_CLIENTS, sizeof *clients);
    if (!clients) return 1;
    char src[64], keyhex[64];
    while (nclients < MAX_CLIENTS) {
        struct client *c = &clients[nclients];
        if (scanf("%63s %255s %63s", src, c->user, keyhex) != 3) break;
        if (strlen(keyhex) != 32) { fprintf(stderr, "bad key\n"); return 2; }
        for (int i = 0; i < 16; i++) {
            int hi = hexval(keyhex[2 * i]), lo = hexval(keyhex[2 * i + 1]);
            if (hi < 0 || lo < 0) { fprintf(stderr, "bad key\n"); return 2; }
            c->key[i] = (uint8_t)(hi << 4 | lo);
        }
        struct sockaddr_in local = {.sin_family = AF_INET};
        if (inet_pton(AF_INET, src, &local.sin_addr) != 1) { fprintf(stderr, "bad source\n"); return 2; }
        c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (c->fd < 0 || bind(c->fd, (struct sockaddr *)&local, sizeof local) != 0 ||
            connect(c->fd, (struct sockaddr *)&server, sizeof server) != 0) {
            perror("socket");
            return 1;
        }
        nclients++;
    }

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu0 = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                  ru.ru_stime.tv_usec / 1e6;
    int ep = epoll_create1(0);
    int next = 0, active = 0, ready = 0, failed = 0;
    struct epoll_event events[256];
    uint8_t buf[2048];
    double started = now_s(), last_answer = started, deadline = started + timeout;
    double last_scan = started;
    while ((next < nclients || active > 0) && now_s() < deadline) {
        while (next < nclients && active < window) {
            struct client *c = &clients[next];
            struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)next};
            epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
            c->state = CHALLENGE;
            send_step(c);
            next++;
            active++;
        }
        int n = epoll_wait(ep, events, 256, 50);
        for (int i = 0; i < n; i++) {
            struct client *c = &clients[events[i].data.u32];
            ssize_t len;
            while ((len = recv(c->fd, buf, sizeof buf, 0)) >= 0) {
                if (c->state >= READY) continue; /* a late duplicate answer */
                on_answer(c, buf, (int)len, &ready, &failed);
                if (c->state >= READY) {
                    active--;
                    last_answer = now_s();
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                }
            }
        }
        double now = now_s();
        if (now - last_scan < 0.1) continue;
        last_scan = now;
        for (int i = 0; i < next; i++) { /* retransmit what went unanswered for 1 s */
            struct client *c = &clients[i];
            if (c->state < READY && now - c->sent_at > 1.0) {
                send(c->fd, c->last, c->last_len, 0);
                c->sent_at = now;
            }
        }
    }
    failed += nclients - ready - failed;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6 - cpu0;
    printf("{\"ready\": %d, \"failed\": %d, \"seconds\": %.6f, \"cpu_seconds\": %.6f}\n", ready,
           failed, last_answer - started, cpu);
    return 0;
}
