/* Closed-loop ping load for bench/ping.py: N SEQPACKET clients, one request in flight
 * each, for a fixed time. Written in C so the load generator costs little next to the
 * server being measured (both share the machine's cores).
 *
 * usage: pingload SOCKET CLIENTS WARMUP_S SECONDS
 * prints "measuring" when the measured window opens, "done" when it closes, then
 * "requests=<n> p50_us=<x> p99_us=<y> errors=<e>" for the window.
 * Every client says hello (protocol v1) first, then sends {"op":"ping",...} with an
 * increasing id and waits for the reply. Replies are checked to carry "ping_reply".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int send_ping(int fd, unsigned id) {
    char buf[96];
    int n = snprintf(buf, sizeof buf, "{\"op\":\"ping\",\"fds\":0,\"id\":%u}", id);
    return send(fd, buf, n, 0) == n ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET CLIENTS WARMUP_S SECONDS\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[2]);
    double warmup = atof(argv[3]), secs = atof(argv[4]);
    int *fds = calloc(n, sizeof *fds);
    double *sent_at = calloc(n, sizeof *sent_at);
    unsigned *ids = calloc(n, sizeof *ids);
    size_t cap = 1 << 20, nlat = 0;
    double *lat = malloc(cap * sizeof *lat);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    int ep = epoll_create1(0);
    char buf[65536];
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_UNIX, SOCK_SEQPACKET, 0);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("connect");
            return 1;
        }
        const char *hello = "{\"op\":\"hello\",\"fds\":0,\"id\":0,\"version\":1,\"client\":\"pingload\"}";
        if (send(fds[i], hello, strlen(hello), 0) < 0 || recv(fds[i], buf, sizeof buf, 0) <= 0) {
            perror("hello");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    double start = now(), measure_from = start + warmup, end = measure_from + secs;
    long requests = 0, errors = 0;
    for (int i = 0; i < n; i++) {
        ids[i] = 1;
        sent_at[i] = now();
        send_ping(fds[i], ids[i]);
    }
    struct epoll_event evs[256];
    int announced = 0;
    for (;;) {
        double t = now();
        if (!announced && t >= measure_from) {
            /* bench/ping.py samples the server's CPU time at these two lines */
            printf("measuring\n");
            fflush(stdout);
            announced = 1;
        }
        if (t >= end) break;
        int k = epoll_wait(ep, evs, 256, 100);
        for (int j = 0; j < k; j++) {
            int i = evs[j].data.u32;
            ssize_t got = recv(fds[i], buf, sizeof buf - 1, MSG_DONTWAIT);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                fprintf(stderr, "client %d: connection lost\n", i);
                return 1;
            }
            buf[got] = 0;
            double done = now();
            if (!strstr(buf, "\"ping_reply\"")) errors++;
            if (sent_at[i] >= measure_from && done < end) {
                requests++;
                if (nlat == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
                lat[nlat++] = (done - sent_at[i]) * 1e6;
            }
            ids[i]++;
            sent_at[i] = done;
            send_ping(fds[i], ids[i]);
        }
    }
    printf("done\n");
    fflush(stdout);
    qsort(lat, nlat, sizeof *lat, cmp);
    double p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[(size_t)(nlat * 0.99)] : 0;
    printf("requests=%ld p50_us=%.1f p99_us=%.1f errors=%ld\n", requests, p50, p99, errors);
    return 0;
}
