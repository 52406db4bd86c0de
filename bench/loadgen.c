/*
 * loadgen: single-threaded epoll load generator for line-echo servers.
 *
 * Load mode: open N connections before any timing starts, then keep `depth`
 * lines in flight on each one, verify every echoed byte against what was
 * sent, record the round-trip time of each line and print one JSON object.
 * Besides the latency percentiles it reports how evenly the connections were
 * served: the per-connection counts of lines completed in the window (min,
 * median, max), how many connections completed none, and Jain's fairness
 * index over those counts, (sum x)^2 / (n * sum x^2): 1 when every
 * connection got the same service, 1/n when one connection got all of it.
 *
 * Idle mode: open N connections, echo one line on each (so the server really
 * holds a live handler per client), print "ready", hold them until stdin
 * closes or --hold expires, then print one JSON object.
 *
 * Build: cc -O2 -Wall -Wextra -o bench/out/loadgen bench/loadgen.c (no extra libraries)
 *
 * TLS (--tls): built with -DLOADGEN_TLS ... -lssl -lcrypto (Debian's libssl-dev),
 * every connection also completes its TLS handshake before timing starts (the
 * connect phase waits for it), then lines go through SSL_write/SSL_read, one
 * record per write. The server's certificate is not verified: this measures
 * the cost of the encrypted session, on loopback, not the PKI. Without
 * -DLOADGEN_TLS the binary is the same as before and --tls is refused.
 *
 * Every wait is bounded: the process stops by itself at
 * connect-timeout + warmup + duration + grace (load) even if the server hangs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define MAX_LINE 1025           /* protocol: 1024 bytes + "\n" */
#define MAX_EVENTS 1024
#define READ_BUF (64 * 1024)
#define STDIN_TAG UINT32_MAX
#define PATTERN_LEN 94          /* printable ASCII '!'..'~', never '\n' */

enum conn_state { C_UNUSED, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_CLOSED };
enum phase { P_CONNECT, P_WARMUP, P_MEASURE, P_DRAIN, P_DONE };

struct conn {
    int fd;
    enum conn_state state;
    int want_out;           /* EPOLLOUT currently registered */
    uint64_t send_seq;      /* lines generated so far */
    uint64_t write_seq;     /* lines fully written so far */
    size_t write_off;       /* bytes of line write_seq already written */
    uint64_t recv_seq;      /* lines fully echoed so far */
    size_t recv_off;        /* bytes of line recv_seq received */
    int cur_bad;            /* line recv_seq already counted as mismatch */
    int opened;             /* the connection was established at some point */
    uint64_t win_lines;     /* lines completed inside the measured window */
    char *ring;             /* depth slots of line_size bytes: lines in flight */
    uint64_t *sent_ns;      /* per-slot send timestamp */
#ifdef LOADGEN_TLS
    SSL *ssl;               /* --tls only */
#endif
};

struct opts {
    const char *host;
    const char *port;
    long conns;
    long line_size;
    long depth;
    double duration;
    double warmup;
    double connect_timeout;
    double grace;
    double hold;
    long connect_concurrency;
    int idle;
    int tls;
};

static struct opts o = {
    .host = "127.0.0.1", .port = NULL, .conns = 1, .line_size = 64, .depth = 1,
    .duration = 3.0, .warmup = 1.0, .connect_timeout = 10.0, .grace = 2.0,
    .hold = 30.0, .connect_concurrency = 256, .idle = 0,
};

static struct conn *conns;
static int ep;
static enum phase phase = P_CONNECT;
static volatile sig_atomic_t stop_flag;
static char pattern[PATTERN_LEN + MAX_LINE];
static char rbuf[READ_BUF];

/* counters */
static long established, connect_failures, errors, open_count;
static uint64_t mismatches, messages, completed_total;
static double connect_s;      /* time taken by the connect phase */
static uint32_t *lat;           /* latency samples in ns, window only */
static size_t lat_n, lat_cap;
static uint64_t lat_dropped;
static int warned_errno[256];
#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;
#endif

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t sec_to_ns(double s) { return (uint64_t)(s * 1e9); }

/* Report each distinct errno once, so a storm of resets cannot flood stderr. */
static void warn_once(int err, const char *what)
{
    if (err >= 0 && err < 256) {
        if (warned_errno[err])
            return;
        warned_errno[err] = 1;
    }
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(err));
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static double cpu_s(const struct timeval *tv)
{
    return (double)tv->tv_sec + (double)tv->tv_usec / 1e6;
}

/* Payload differs per line (connection id, sequence number, shifted filler)
 * so dropped, duplicated or reordered lines show up as mismatches. */
static void gen_line(char *dst, size_t idx, uint64_t seq)
{
    size_t body = (size_t)o.line_size - 1;
    char hdr[48];
    int n = snprintf(hdr, sizeof hdr, "%zx:%" PRIx64 ":", idx, seq);
    size_t h = (size_t)n < body ? (size_t)n : body;
    memcpy(dst, hdr, h);
    size_t shift = (size_t)((seq * 31u + idx * 7u) % PATTERN_LEN);
    memcpy(dst + h, pattern + shift, body - h);
    dst[body] = '\n';
}

static void set_events(struct conn *c, int want_out)
{
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0)};
    ev.data.u32 = (uint32_t)(c - conns);
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        warn_once(errno, "epoll_ctl(MOD)");
    c->want_out = want_out;
}

static void close_conn(struct conn *c, int is_error)
{
    if (c->state == C_OPEN || c->state == C_CONNECTING || c->state == C_HANDSHAKE) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        if (c->state == C_OPEN)
            open_count--;
    }
#ifdef LOADGEN_TLS
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
#endif
    c->fd = -1;
    c->state = C_CLOSED;
    if (is_error)
        errors++;
}

#ifdef LOADGEN_TLS
/* OpenSSL's outcome as the plain-socket convention: n > 0, 0 at the peer's
 * close, or -1 with errno (EAGAIN when OpenSSL waits for the socket). */
static ssize_t tls_result(struct conn *c, int r)
{
    if (r > 0)
        return r;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
    }
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    if (e != SSL_ERROR_SYSCALL || errno == 0)
        errno = EPROTO;
    ERR_clear_error();
    return -1;
}

/* Drive the handshake; the connection counts as established once it is done. */
static void tls_step(struct conn *c)
{
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->state = C_OPEN;
        open_count++;
        established++;
        set_events(c, 0);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        set_events(c, e == SSL_ERROR_WANT_WRITE);
        return;
    }
    unsigned long code = ERR_get_error();
    fprintf(stderr, "loadgen: TLS handshake: %s\n",
            code ? ERR_reason_error_string(code) : "connection closed");
    ERR_clear_error();
    close_conn(c, 0);
    connect_failures++;
}
#endif

static ssize_t conn_send(struct conn *c, struct msghdr *mh)
{
#ifdef LOADGEN_TLS
    if (c->ssl)   /* one record per call; flush_out loops for the rest */
        return tls_result(c, SSL_write(c->ssl, mh->msg_iov[0].iov_base,
                                       (int)mh->msg_iov[0].iov_len));
#endif
    return sendmsg(c->fd, mh, MSG_NOSIGNAL);
}

static ssize_t conn_recv(struct conn *c, char *buf, size_t n)
{
#ifdef LOADGEN_TLS
    if (c->ssl)
        return tls_result(c, SSL_read(c->ssl, buf, (int)n));
#endif
    return read(c->fd, buf, n);
}

/* Write every generated-but-unwritten byte; the unwritten lines are
 * contiguous in the ring, so at most two iovecs (wrap-around) are needed. */
static void flush_out(struct conn *c)
{
    size_t ls = (size_t)o.line_size, ring_bytes = ls * (size_t)o.depth;
    while (c->state == C_OPEN && c->write_seq < c->send_seq) {
        size_t start = (size_t)(c->write_seq % (uint64_t)o.depth) * ls + c->write_off;
        size_t total = (size_t)(c->send_seq - c->write_seq) * ls - c->write_off;
        size_t first = total < ring_bytes - start ? total : ring_bytes - start;
        struct iovec iov[2] = {
            {.iov_base = c->ring + start, .iov_len = first},
            {.iov_base = c->ring, .iov_len = total - first},
        };
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = total > first ? 2 : 1};
        ssize_t n = conn_send(c, &mh);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->want_out)
                    set_events(c, 1);
                return;
            }
            warn_once(errno, "send");
            close_conn(c, 1);
            return;
        }
        c->write_off += (size_t)n;
        c->write_seq += c->write_off / ls;
        c->write_off %= ls;
    }
    if (c->want_out && c->state == C_OPEN)
        set_events(c, 0);
}

static void start_line(struct conn *c, uint64_t t)
{
    size_t slot = (size_t)(c->send_seq % (uint64_t)o.depth);
    gen_line(c->ring + slot * (size_t)o.line_size, (size_t)(c - conns), c->send_seq);
    c->sent_ns[slot] = t;
    c->send_seq++;
}

static void record_latency(uint64_t ns)
{
    if (lat_n == lat_cap) {
        size_t cap = lat_cap ? lat_cap * 2 : 65536;
        uint32_t *p = realloc(lat, cap * sizeof *p);
        if (!p) {
            lat_dropped++;
            return;
        }
        lat = p;
        lat_cap = cap;
    }
    lat[lat_n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void handle_read(struct conn *c)
{
    size_t ls = (size_t)o.line_size;
    ssize_t n = conn_recv(c, rbuf, sizeof rbuf);
    if (n == 0) {
        close_conn(c, 1);   /* the server closed a connection we still use */
        return;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        warn_once(errno, "read");
        close_conn(c, 1);
        return;
    }
    uint64_t t = now_ns();
    const char *p = rbuf;
    size_t left = (size_t)n;
    while (left > 0) {
        /* More bytes than we have written cannot be an echo of ours. */
        if (c->recv_seq > c->write_seq ||
            (c->recv_seq == c->write_seq && c->recv_off + 1 > c->write_off)) {
            mismatches++;
            close_conn(c, 0);
            return;
        }
        size_t slot = (size_t)(c->recv_seq % (uint64_t)o.depth);
        size_t k = ls - c->recv_off;
        if (k > left)
            k = left;
        if (!c->cur_bad && memcmp(c->ring + slot * ls + c->recv_off, p, k) != 0) {
            mismatches++;
            c->cur_bad = 1;
        }
        c->recv_off += k;
        p += k;
        left -= k;
        if (c->recv_off == ls) {
            c->recv_off = 0;
            c->cur_bad = 0;
            c->recv_seq++;
            completed_total++;
            if (phase == P_MEASURE) {
                messages++;
                c->win_lines++;
                record_latency(t - c->sent_ns[slot]);
            }
            if (phase == P_WARMUP || phase == P_MEASURE)
                start_line(c, t);
        }
    }
    flush_out(c);
}

static void handle_event(struct epoll_event *ev)
{
    struct conn *c = &conns[ev->data.u32];
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err) {
            warn_once(err, "connect");
            close_conn(c, 0);
            connect_failures++;
            return;
        }
#ifdef LOADGEN_TLS
        if (o.tls) {
            c->ssl = SSL_new(tls_ctx);
            if (!c->ssl || !SSL_set_fd(c->ssl, c->fd))
                die("SSL_new failed");
            SSL_set_connect_state(c->ssl);
            c->state = C_HANDSHAKE;
            tls_step(c);
            return;
        }
#endif
        c->state = C_OPEN;
        c->opened = 1;
        open_count++;
        established++;
        set_events(c, 0);
        return;
    }
#ifdef LOADGEN_TLS
    if (c->state == C_HANDSHAKE) {
        tls_step(c);
        return;
    }
#endif
    if (c->state != C_OPEN)
        return;
    if (ev->events & EPOLLIN) {
        handle_read(c);
#ifdef LOADGEN_TLS
        /* Records OpenSSL already holds decrypted never make the socket readable again. */
        while (c->ssl && c->state == C_OPEN && SSL_pending(c->ssl) > 0)
            handle_read(c);
#endif
    } else if (ev->events & (EPOLLERR | EPOLLHUP)) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        warn_once(err ? err : ECONNRESET, "socket");
        close_conn(c, 1);
        return;
    }
    if (c->state == C_OPEN && (ev->events & EPOLLOUT))
        flush_out(c);
}

/* Returns 1 if an event loop turn happened, 0 on an interrupted wait. */
static int poll_once(uint64_t deadline, int *stdin_eof)
{
    static struct epoll_event evs[MAX_EVENTS];
    uint64_t t = now_ns();
    int timeout_ms = 0;
    if (deadline > t) {
        uint64_t ms = (deadline - t + 999999u) / 1000000u;
        timeout_ms = ms > 100 ? 100 : (int)ms;   /* re-check clocks/flags often */
    }
    int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        return 0;
    }
    for (int i = 0; i < n; i++) {
        if (evs[i].data.u32 == STDIN_TAG) {
            char tmp[256];
            ssize_t r = read(STDIN_FILENO, tmp, sizeof tmp);
            int eof = r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR);
            if (eof && stdin_eof) {
                *stdin_eof = 1;
                epoll_ctl(ep, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
            }
            continue;
        }
        handle_event(&evs[i]);
    }
    return 1;
}

static void open_one(size_t i, const struct addrinfo *ai)
{
    struct conn *c = &conns[i];
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
    if (fd < 0) {
        warn_once(errno, "socket");
        c->state = C_CLOSED;
        connect_failures++;
        return;
    }
    int one = 1;
    /* Lines are small and latency is measured: do not let Nagle batch them. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLOUT};
    ev.data.u32 = (uint32_t)i;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        warn_once(errno, "epoll_ctl(ADD)");
        close(fd);
        c->fd = -1;
        c->state = C_CLOSED;
        connect_failures++;
        return;
    }
    c->state = C_CONNECTING;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
        warn_once(errno, "connect");
        close_conn(c, 0);
        connect_failures++;
    }
    /* An immediate success is reported as EPOLLOUT too: handled there. */
}

/* Open every connection before timing starts; the whole phase is bounded by
 * --connect-timeout, and at most --connect-concurrency handshakes are pending
 * at once so a slow accept loop is not flooded with SYNs. */
static void connect_all(const struct addrinfo *ai)
{
    uint64_t deadline = now_ns() + sec_to_ns(o.connect_timeout);
    size_t next = 0, total = (size_t)o.conns;
    for (;;) {
        size_t pending = (size_t)(next - (size_t)established - (size_t)connect_failures);
        while (next < total && pending < (size_t)o.connect_concurrency) {
            open_one(next++, ai);
            pending = (size_t)(next - (size_t)established - (size_t)connect_failures);
        }
        if ((size_t)(established + connect_failures) >= total)
            break;
        if (stop_flag || now_ns() >= deadline)
            break;
        poll_once(deadline, NULL);
    }
    for (size_t i = 0; i < total; i++) {
        if (conns[i].state == C_CONNECTING || conns[i].state == C_HANDSHAKE ||
            conns[i].state == C_UNUSED) {
            if (conns[i].state != C_UNUSED)
                close_conn(&conns[i], 0);
            conns[i].state = C_CLOSED;
            connect_failures++;
        }
    }
    if (connect_failures)
        fprintf(stderr, "loadgen: %ld of %ld connections failed\n", connect_failures, o.conns);
}

static int all_answered(void)
{
    for (long i = 0; i < o.conns; i++) {
        const struct conn *c = &conns[i];
        if (c->state == C_OPEN && c->recv_seq < c->send_seq)
            return 0;
    }
    return 1;
}

static uint64_t unanswered(void)
{
    uint64_t u = 0;
    for (long i = 0; i < o.conns; i++)
        u += conns[i].send_seq - conns[i].recv_seq;
    return u;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile, in microseconds. */
static double pct_us(double q)
{
    if (lat_n == 0)
        return 0.0;
    double r = q * (double)lat_n;
    size_t rank = (size_t)r;
    if ((double)rank < r)
        rank++;   /* ceil without libm */
    if (rank < 1)
        rank = 1;
    if (rank > lat_n)
        rank = lat_n;
    return lat[rank - 1] / 1000.0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Fairness over the connections that were ever established (a connection
 * that failed to connect was never offered any service). */
struct fairness {
    uint64_t min, median, max;
    long starved;
    double jain;
};

static struct fairness fairness(void)
{
    struct fairness f = {0, 0, 0, 0, 0.0};
    uint64_t *x = malloc(((size_t)o.conns + 1) * sizeof *x);
    if (!x)
        return f;
    size_t n = 0;
    double sum = 0, sum_sq = 0;
    for (long i = 0; i < o.conns; i++) {
        if (!conns[i].opened)
            continue;
        uint64_t v = conns[i].win_lines;
        x[n++] = v;
        sum += (double)v;
        sum_sq += (double)v * (double)v;
        if (v == 0)
            f.starved++;
    }
    if (n) {
        qsort(x, n, sizeof *x, cmp_u64);
        f.min = x[0];
        f.median = x[n / 2];
        f.max = x[n - 1];
        f.jain = sum_sq > 0 ? sum * sum / ((double)n * sum_sq) : 0.0;
    }
    free(x);
    return f;
}

static void print_json(double window_s, const struct rusage *r0, const struct rusage *r1)
{
    struct fairness f = fairness();
    if (lat_n)
        qsort(lat, lat_n, sizeof *lat, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < lat_n; i++)
        sum += lat[i];
    /* A rate over the idle hold would be meaningless: report it as 0. */
    double rate = window_s > 0 && !o.idle ? (double)messages / window_s : 0.0;
    printf("{\"mode\": \"%s\", \"connections\": %ld, \"connections_requested\": %ld, "
           "\"connect_failures\": %ld, \"line_size\": %ld, \"depth\": %ld, "
           "\"window_s\": %.6f, \"warmup_s\": %.3f, \"connect_s\": %.6f, "
           "\"messages\": %" PRIu64 ", \"completed_total\": %" PRIu64 ", "
           "\"messages_per_s\": %.1f, \"mb_per_s\": %.3f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"p99_9_us\": %.1f, \"max_us\": %.1f, "
           "\"mean_us\": %.1f, \"latency_samples_dropped\": %" PRIu64 ", "
           "\"mismatches\": %" PRIu64 ", \"errors\": %ld, \"unanswered\": %" PRIu64 ", "
           "\"conn_lines_min\": %" PRIu64 ", \"conn_lines_median\": %" PRIu64 ", "
           "\"conn_lines_max\": %" PRIu64 ", \"conns_starved\": %ld, \"jain\": %.4f, "
           "\"client_cpu_user_s\": %.4f, \"client_cpu_sys_s\": %.4f}\n",
           o.idle ? "idle" : "load", established, o.conns, connect_failures, o.line_size,
           o.depth, window_s, o.idle ? 0.0 : o.warmup, connect_s, messages,
           completed_total, rate, rate * (double)o.line_size / 1e6, pct_us(0.50),
           pct_us(0.99), pct_us(0.999), lat_n ? lat[lat_n - 1] / 1000.0 : 0.0,
           lat_n ? sum / (double)lat_n / 1000.0 : 0.0, lat_dropped, mismatches, errors,
           unanswered(), f.min, f.median, f.max, f.starved, f.jain, cpu_s(&r1->ru_utime) - cpu_s(&r0->ru_utime),
           cpu_s(&r1->ru_stime) - cpu_s(&r0->ru_stime));
    fflush(stdout);
}

static void marker(const char *s)
{
    fputs(s, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

static void run_load(void)
{
    struct rusage r0 = {0}, r1 = {0};
    uint64_t t = now_ns();
    uint64_t warm_end = t + sec_to_ns(o.warmup);
    uint64_t win_end = warm_end + sec_to_ns(o.duration);
    uint64_t hard_end = win_end + sec_to_ns(o.grace);
    uint64_t win_start_t = t, win_end_t = 0;

    phase = o.warmup > 0 ? P_WARMUP : P_MEASURE;
    if (phase == P_MEASURE) {
        getrusage(RUSAGE_SELF, &r0);
        marker("window-start");
    }
    for (long i = 0; i < o.conns; i++) {
        struct conn *c = &conns[i];
        if (c->state != C_OPEN)
            continue;
        for (long d = 0; d < o.depth; d++)
            start_line(c, t);
        flush_out(c);
    }
    while (phase != P_DONE) {
        t = now_ns();
        if (phase == P_WARMUP && (t >= warm_end || stop_flag)) {
            phase = P_MEASURE;
            win_start_t = t;
            getrusage(RUSAGE_SELF, &r0);
            marker("window-start");
        }
        if (phase == P_MEASURE && (t >= win_end || stop_flag)) {
            phase = P_DRAIN;   /* stop issuing lines; wait for the echoes */
            win_end_t = t;
            getrusage(RUSAGE_SELF, &r1);
            marker("window-end");
        }
        if (phase == P_DRAIN && (all_answered() || t >= hard_end || stop_flag)) {
            phase = P_DONE;
            break;
        }
        if (open_count == 0 && phase != P_DRAIN) {
            /* every connection is gone: nothing more can be measured */
            if (phase == P_WARMUP) {
                win_start_t = t;
                getrusage(RUSAGE_SELF, &r0);
                marker("window-start");
            }
            win_end_t = t;
            getrusage(RUSAGE_SELF, &r1);
            marker("window-end");
            break;
        }
        poll_once(phase == P_WARMUP ? warm_end : phase == P_MEASURE ? win_end : hard_end,
                  NULL);
    }
    print_json((double)(win_end_t - win_start_t) / 1e9, &r0, &r1);
}

static void run_idle(void)
{
    struct rusage r0 = {0}, r1 = {0};
    getrusage(RUSAGE_SELF, &r0);
    uint64_t t = now_ns();
    uint64_t deadline = t + sec_to_ns(o.connect_timeout);
    phase = P_DRAIN;   /* exactly one line per connection, no follow-ups */
    for (long i = 0; i < o.conns; i++) {
        struct conn *c = &conns[i];
        if (c->state != C_OPEN)
            continue;
        start_line(c, t);
        flush_out(c);
    }
    while (!all_answered() && !stop_flag && now_ns() < deadline)
        poll_once(deadline, NULL);
    messages = completed_total;
    marker("ready");

    /* Hold: any event on a connection now is the server closing it. */
    int stdin_eof = 0;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u32 = STDIN_TAG;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev) < 0)
        stdin_eof = 1;   /* stdin is /dev/null or a file: hold for --hold */
    uint64_t hold_start = now_ns(), hold_end = hold_start + sec_to_ns(o.hold);
    if (stdin_eof) {
        while (!stop_flag && now_ns() < hold_end)
            poll_once(hold_end, NULL);
    } else {
        while (!stdin_eof && !stop_flag && now_ns() < hold_end)
            poll_once(hold_end, &stdin_eof);
    }
    double held = (double)(now_ns() - hold_start) / 1e9;
    getrusage(RUSAGE_SELF, &r1);
    print_json(held, &r0, &r1);
}

static void usage(FILE *f)
{
    fputs("usage: loadgen --port P [--host H] [-c N] [--line-size B] [--depth D]\n"
          "               [--duration S] [--warmup S] [--connect-timeout S] [--grace S]\n"
          "               [--connect-concurrency K] [--mode load|idle] [--hold S] [--tls]\n"
          "  --tls: TLS sessions (handshakes done before timing; needs -DLOADGEN_TLS)\n"
          "  --line-size counts the trailing newline (2..1025)\n"
          "  --connect-timeout bounds the whole connect phase (and the idle echo)\n"
          "  --grace: time after the window to collect outstanding echoes\n"
          "  idle mode: echo one line per connection, print \"ready\", hold the\n"
          "  connections until stdin closes or --hold seconds pass\n", f);
}

static long parse_long(const char *s, const char *name, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        die("%s must be an integer in [%ld, %ld], got '%s'", name, lo, hi, s);
    return v;
}

static double parse_double(const char *s, const char *name, double lo, double hi)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !(v >= lo && v <= hi))
        die("%s must be a number in [%g, %g], got '%s'", name, lo, hi, s);
    return v;
}

int main(int argc, char **argv)
{
    static const struct option lopts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"connections", required_argument, 0, 'c'},
        {"line-size", required_argument, 0, 's'},
        {"depth", required_argument, 0, 'd'},
        {"duration", required_argument, 0, 't'},
        {"warmup", required_argument, 0, 'w'},
        {"connect-timeout", required_argument, 0, 'T'},
        {"grace", required_argument, 0, 'g'},
        {"connect-concurrency", required_argument, 0, 'k'},
        {"mode", required_argument, 0, 'm'},
        {"hold", required_argument, 0, 'H'},
        {"tls", no_argument, 0, 'S'},
        {"help", no_argument, 0, '?'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "h:p:c:s:d:t:w:T:g:k:m:H:S", lopts, NULL)) != -1) {
        switch (ch) {
        case 'h': o.host = optarg; break;
        case 'p': o.port = optarg; break;
        case 'c': o.conns = parse_long(optarg, "--connections", 1, 1000000); break;
        case 's': o.line_size = parse_long(optarg, "--line-size", 2, MAX_LINE); break;
        case 'd': o.depth = parse_long(optarg, "--depth", 1, 4096); break;
        case 't': o.duration = parse_double(optarg, "--duration", 0.01, 86400); break;
        case 'w': o.warmup = parse_double(optarg, "--warmup", 0, 86400); break;
        case 'T': o.connect_timeout = parse_double(optarg, "--connect-timeout", 0.01, 3600); break;
        case 'g': o.grace = parse_double(optarg, "--grace", 0, 3600); break;
        case 'k': o.connect_concurrency = parse_long(optarg, "--connect-concurrency", 1, 1000000); break;
        case 'H': o.hold = parse_double(optarg, "--hold", 0, 86400); break;
        case 'S': o.tls = 1; break;
        case 'm':
            if (strcmp(optarg, "load") == 0)
                o.idle = 0;
            else if (strcmp(optarg, "idle") == 0)
                o.idle = 1;
            else
                die("--mode must be load or idle");
            break;
        default:
            usage(ch == '?' && optopt == 0 ? stdout : stderr);
            return ch == '?' && optopt == 0 ? 0 : 2;
        }
    }
    if (!o.port || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (o.idle)
        o.depth = 1;
    if (o.tls) {
#ifdef LOADGEN_TLS
        tls_ctx = SSL_CTX_new(TLS_client_method());
        if (!tls_ctx)
            die("SSL_CTX_new failed");
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        /* flush_out may retry a write from a ring slot that moved (wrap-around). */
        SSL_CTX_set_mode(tls_ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                      SSL_MODE_ENABLE_PARTIAL_WRITE);
#else
        die("--tls: this loadgen was built without -DLOADGEN_TLS");
#endif
    }

    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* Last-resort bound in case a bug ever stalls the loop. */
    double budget = o.connect_timeout * 2 + (o.idle ? o.hold : o.warmup + o.duration + o.grace);
    alarm((unsigned)budget + 31);

    /* Many connections need many descriptors: take all the kernel allows. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)o.conns + 16 > rl.rlim_cur)
        fprintf(stderr, "loadgen: RLIMIT_NOFILE %llu is below %ld connections\n",
                (unsigned long long)rl.rlim_cur, o.conns);

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int gai = getaddrinfo(o.host, o.port, &hints, &ai);
    if (gai)
        die("cannot resolve %s:%s: %s", o.host, o.port, gai_strerror(gai));

    for (size_t i = 0; i < sizeof pattern; i++)
        pattern[i] = (char)('!' + i % PATTERN_LEN);

    conns = calloc((size_t)o.conns, sizeof *conns);
    if (!conns)
        die("out of memory");
    for (long i = 0; i < o.conns; i++) {
        conns[i].fd = -1;
        conns[i].ring = malloc((size_t)o.depth * (size_t)o.line_size);
        conns[i].sent_ns = calloc((size_t)o.depth, sizeof(uint64_t));
        if (!conns[i].ring || !conns[i].sent_ns)
            die("out of memory");
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1: %s", strerror(errno));

    uint64_t c0 = now_ns();
    connect_all(ai);
    connect_s = (double)(now_ns() - c0) / 1e9;
    freeaddrinfo(ai);

    if (o.idle)
        run_idle();
    else
        run_load();

    for (long i = 0; i < o.conns; i++)
        if (conns[i].state == C_OPEN)
            close(conns[i].fd);
    return 0;
}
