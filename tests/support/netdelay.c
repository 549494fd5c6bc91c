/*
 * netdelay: a TCP relay that adds a fixed one-way delay in both directions (a network between two
 * loopback processes), for tests and bench/. Built at run time by tests/support/netdelay.py with the system cc.
 *
 * Why hand-written C: the packaged ways to delay traffic (tc/netem) need a kernel qdisc this kind of
 * machine does not have ("qdisc kind is unknown") and root; socat, haproxy, toxiproxy and friends either add
 * no delay or add it per connection set-up, not per chunk in both directions. A Python relay costs about a
 * core at 20k messages/s, which on a 2-core box is the bench's own CPU. This one is a single epoll loop:
 * every chunk read is timestamped and written out no earlier than now + delay, in order per direction.
 *
 * Because the delay is the same for every chunk and time only moves forward, chunks fall due in the order
 * they were read, across all connections: one FIFO of (due time, direction) drives a single timerfd.
 *
 * Usage: netdelay LISTEN_HOST TARGET_HOST TARGET_PORT DELAY_US
 * Prints "port N" on stdout once listening (on a free port). SIGTERM/SIGINT: close everything, print
 * "stats accepted=... bytes_up=... bytes_down=..." and exit 0. The TCP handshake itself is not delayed
 * (the client's connect() completes at the relay); the first bytes are.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536
#define HIGH_WATER (4 * 1024 * 1024) /* stop reading a source while this much waits for its destination */

struct chunk {
    struct chunk *next;
    uint64_t due;
    size_t len, off; /* len == 0: the source's EOF, passed on as shutdown(SHUT_WR) */
    char data[];
};

struct pair;

struct dir {
    struct pair *pair;
    int src, dst; /* indexes into pair->fd */
    struct chunk *head, *tail;
    size_t queued;
    int eof_read, eof_sent, blocked; /* blocked: dst said EAGAIN, waiting for EPOLLOUT */
};

struct pair {
    int fd[2]; /* 0: client, 1: server */
    struct dir dir[2]; /* 0: client -> server, 1: server -> client */
    int refs; /* FIFO entries pointing here, plus one while open */
    int dead;
    int gone[2]; /* this side hung up after its EOF was read: out of epoll (a level-triggered HUP would spin) */
    uint32_t events[2];
    struct pair *grave; /* freed at the end of the loop turn: events of this turn may still name it */
};

struct due { uint64_t at; struct dir *dir; };

static struct due *fifo;
static size_t fifo_head, fifo_len, fifo_cap;
static int ep, tfd;
static uint64_t delay_ns, armed;
static unsigned long long n_accepted, n_bytes[2];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "netdelay: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fifo_push(uint64_t at, struct dir *d) {
    if (fifo_head + fifo_len == fifo_cap) {
        if (fifo_head > fifo_cap / 2) {
            memmove(fifo, fifo + fifo_head, fifo_len * sizeof *fifo);
            fifo_head = 0;
        } else {
            fifo_cap = fifo_cap ? fifo_cap * 2 : 1024;
            fifo = realloc(fifo, fifo_cap * sizeof *fifo);
            if (!fifo) die("realloc");
        }
    }
    fifo[fifo_head + fifo_len++] = (struct due){at, d};
    d->pair->refs++;
}

static struct pair *graveyard;

static void unref(struct pair *p) {
    if (--p->refs == 0) {
        p->grave = graveyard;
        graveyard = p;
    }
}

static void set_events(struct pair *p, int side) {
    if (p->dead || p->gone[side]) return;
    /* Read from this side unless its outgoing direction has piled up or ended. */
    struct dir *out = &p->dir[side], *in = &p->dir[1 - side];
    uint32_t ev = 0;
    if (!out->eof_read && out->queued < HIGH_WATER) ev |= EPOLLIN;
    if (in->blocked) ev |= EPOLLOUT;
    if (ev == p->events[side]) return;
    struct epoll_event e = {.events = ev, .data.u64 = ((uint64_t)(uintptr_t)p << 1) | (uint64_t)side};
    p->events[side] = ev;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, p->fd[side], &e) < 0) die("epoll_ctl");
}

static void kill_pair(struct pair *p, int reset) {
    if (p->dead) return;
    p->dead = 1;
    for (int i = 0; i < 2; i++) {
        if (reset) {
            struct linger l = {1, 0}; /* close() sends RST: a reset from one end reaches the other */
            setsockopt(p->fd[i], SOL_SOCKET, SO_LINGER, &l, sizeof l);
        }
        close(p->fd[i]);
        p->fd[i] = -1;
        for (struct chunk *c = p->dir[i].head, *n; c; c = n) {
            n = c->next;
            free(c);
        }
        p->dir[i].head = p->dir[i].tail = NULL;
    }
    unref(p);
}

/* Write every chunk of d that is due; returns -1 if the pair died. */
static int flush(struct dir *d, uint64_t now) {
    struct pair *p = d->pair;
    while (d->head && d->head->due <= now) {
        struct chunk *c = d->head;
        if (c->len == 0) {
            shutdown(p->fd[d->dst], SHUT_WR);
            d->eof_sent = 1;
        } else {
            while (c->off < c->len) {
                ssize_t n = send(p->fd[d->dst], c->data + c->off, c->len - c->off, MSG_NOSIGNAL);
                if (n < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK) {
                        if (!d->blocked) {
                            d->blocked = 1;
                            set_events(p, d->dst);
                        }
                        return 0;
                    }
                    if (errno == EINTR) continue;
                    kill_pair(p, 1);
                    return -1;
                }
                c->off += (size_t)n;
                n_bytes[d->src] += (unsigned long long)n;
            }
        }
        d->queued -= c->len;
        d->head = c->next;
        if (!d->head) d->tail = NULL;
        free(c);
    }
    d->blocked = 0;
    set_events(p, d->dst);
    set_events(p, d->src);
    if (p->dir[0].eof_sent && p->dir[1].eof_sent) {
        kill_pair(p, 0);
        return -1;
    }
    return 0;
}

static void on_readable(struct pair *p, int side, uint64_t now) {
    struct dir *d = &p->dir[side];
    for (int rounds = 0; rounds < 4 && !d->eof_read && d->queued < HIGH_WATER; rounds++) {
        struct chunk *c = malloc(sizeof *c + CHUNK);
        if (!c) die("malloc");
        ssize_t n = recv(p->fd[side], c->data, CHUNK, 0);
        if (n < 0) {
            free(c);
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            kill_pair(p, 1);
            return;
        }
        if (n < CHUNK) {
            struct chunk *small = realloc(c, sizeof *c + (size_t)n);
            if (small) c = small;
        }
        c->next = NULL;
        c->due = now + delay_ns;
        c->len = (size_t)n;
        c->off = 0;
        if (d->tail) d->tail->next = c; else d->head = c;
        d->tail = c;
        d->queued += (size_t)n;
        if (n == 0) d->eof_read = 1;
        fifo_push(c->due, d);
        if (n < CHUNK) break;
    }
    set_events(p, side);
}

static void accept_all(int lfd, const struct sockaddr_in *target) {
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) return;
            if (errno == EMFILE || errno == ENFILE) return; /* retried on the next readiness */
            die("accept");
        }
        n_accepted++;
        /* Loopback only: a blocking connect returns at once (refused or accepted), so the loop never waits. */
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (const struct sockaddr *)target, sizeof *target) < 0) {
            if (s >= 0) close(s);
            struct linger l = {1, 0}; /* the upstream is down: the client sees a reset, as behind a proxy */
            setsockopt(c, SOL_SOCKET, SO_LINGER, &l, sizeof l);
            close(c);
            continue;
        }
        fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct pair *p = calloc(1, sizeof *p);
        if (!p) die("calloc");
        p->fd[0] = c;
        p->fd[1] = s;
        p->refs = 1;
        for (int i = 0; i < 2; i++) {
            p->dir[i].pair = p;
            p->dir[i].src = i;
            p->dir[i].dst = 1 - i;
            struct epoll_event e = {.events = EPOLLIN, .data.u64 = ((uint64_t)(uintptr_t)p << 1) | (uint64_t)i};
            p->events[i] = EPOLLIN;
            if (epoll_ctl(ep, EPOLL_CTL_ADD, p->fd[i], &e) < 0) die("epoll_ctl add");
        }
    }
}

static void arm(uint64_t at) {
    if (at == armed) return;
    armed = at;
    struct itimerspec its = {0};
    if (at) {
        its.it_value.tv_sec = (time_t)(at / 1000000000u);
        its.it_value.tv_nsec = (long)(at % 1000000000u);
    }
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
}

/* Flush every direction with a chunk due by now; arm the timer for the next one. */
static void run_due(void) {
    uint64_t now = now_ns();
    while (fifo_len && fifo[fifo_head].at <= now) {
        struct dir *d = fifo[fifo_head].dir;
        fifo_head++;
        fifo_len--;
        struct pair *p = d->pair;
        if (!p->dead && !d->blocked) flush(d, now);
        unref(p);
    }
    if (!fifo_len) fifo_head = 0;
    arm(fifo_len ? fifo[fifo_head].at : 0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: netdelay LISTEN_HOST TARGET_HOST TARGET_PORT DELAY_US\n");
        return 2;
    }
    struct sockaddr_in listen_at = {.sin_family = AF_INET}, target = {.sin_family = AF_INET};
    if (inet_pton(AF_INET, argv[1], &listen_at.sin_addr) != 1 || inet_pton(AF_INET, argv[2], &target.sin_addr) != 1) {
        fprintf(stderr, "netdelay: hosts must be IPv4 addresses\n");
        return 2;
    }
    target.sin_port = htons((uint16_t)atoi(argv[3]));
    delay_ns = (uint64_t)strtoull(argv[4], NULL, 10) * 1000u;
    prctl(PR_SET_TIMERSLACK, 1UL); /* the default 50 us slack would be a fifth of a 0.25 ms delay */
    signal(SIGPIPE, SIG_IGN);

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (sfd < 0 || lfd < 0) die("socket");
    if (bind(lfd, (struct sockaddr *)&listen_at, sizeof listen_at) < 0 || listen(lfd, 4096) < 0) die("bind/listen");
    socklen_t len = sizeof listen_at;
    getsockname(lfd, (struct sockaddr *)&listen_at, &len);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (tfd < 0 || ep < 0) die("timerfd/epoll");
    /* Tags 1-3 can never be a pair: pair pointers are aligned, shifted left once, with the side in bit 0. */
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &e);
    e.data.u64 = 2;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &e);
    e.data.u64 = 3;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &e);
    printf("port %d\n", ntohs(listen_at.sin_port));
    fflush(stdout);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        uint64_t now = now_ns();
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == 1) {
                accept_all(lfd, &target);
            } else if (tag == 2) {
                uint64_t ticks;
                while (read(tfd, &ticks, sizeof ticks) > 0) {}
                armed = 0; /* fired: arm() must set it again even for the same time */
            } else if (tag == 3) {
                printf("stats accepted=%llu bytes_up=%llu bytes_down=%llu\n", n_accepted, n_bytes[0], n_bytes[1]);
                fflush(stdout);
                return 0; /* the kernel closes every socket; clients see their connections end */
            } else {
                struct pair *p = (struct pair *)(uintptr_t)(tag >> 1);
                int side = (int)(tag & 1);
                uint32_t ev = events[i].events;
                if (p->dead) continue;
                if (ev & EPOLLERR) {
                    kill_pair(p, 1);
                    continue;
                }
                if (ev & EPOLLOUT) {
                    struct dir *in = &p->dir[1 - side];
                    in->blocked = 0;
                    flush(in, now);
                }
                if (!p->dead && !p->dir[side].eof_read && (ev & (EPOLLIN | EPOLLHUP))) on_readable(p, side, now);
                if (!p->dead && (ev & EPOLLHUP) && p->dir[side].eof_read && !p->gone[side]) {
                    p->gone[side] = 1;
                    epoll_ctl(ep, EPOLL_CTL_DEL, p->fd[side], NULL);
                }
            }
        }
        run_due();
        while (graveyard) {
            struct pair *p = graveyard;
            graveyard = p->grave;
            free(p);
        }
    }
}
