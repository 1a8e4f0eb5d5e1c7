/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Tests of libdwcp's C API against include/dwcp.h: every function, NULL
 * arguments, bad URIs, double free, use after cancel, and a real loopback
 * transfer (outgoing -> incoming on 127.0.0.1, both directions, two
 * channels). Built and run under ASan+UBSan by tests/c/run.sh.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include "dwcp.h"

static int failures;
static int checks;

#define CHECK(cond)                                                          \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            failures++;                                                      \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
        }                                                                    \
    } while (0)

#define CHECK_RC(expr, want)                                                 \
    do {                                                                     \
        dwcp_result rc_ = (expr);                                            \
        checks++;                                                            \
        if (rc_ != (want)) {                                                 \
            failures++;                                                      \
            fprintf(stderr, "%s:%d: %s = %u (%s), want %s\n", __FILE__,      \
                    __LINE__, #expr, (unsigned)rc_, dwcp_result_str(rc_),    \
                    #want);                                                  \
        }                                                                    \
    } while (0)

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* A TCP port on 127.0.0.1 that nobody listens on (bound, then closed). */
static uint16_t closed_port(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    uint16_t port;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(s, (struct sockaddr *)&a, sizeof(a));
    getsockname(s, (struct sockaddr *)&a, &len);
    port = ntohs(a.sin_port);
    close(s);
    return port;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads exactly n bytes (or returns -1 on EOF/error/5 s timeout). */
static int read_all(int fd, unsigned char *p, size_t n)
{
    while (n > 0) {
        struct pollfd pfd = { fd, POLLIN, 0 };
        ssize_t r;

        if (poll(&pfd, 1, 5000) != 1) {
            return -1;
        }
        r = read(fd, p, n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void fill(unsigned char *buf, size_t n, unsigned seed)
{
    size_t i;
    uint32_t x = seed * 2654435761u + 1;

    for (i = 0; i < n; i++) {
        /* half pages of zeros, half pseudo-random: like guest RAM */
        if ((i / 4096) % 2 == 0) {
            buf[i] = 0;
        } else {
            x = x * 1103515245u + 12345u;
            buf[i] = (unsigned char)(x >> 16);
        }
    }
}

static void test_version_and_results(void)
{
    const uint32_t codes[] = {
        DWCP_OK, DWCP_AGAIN, DWCP_NULL_PARAMETER, DWCP_INVALID_HANDLE,
        DWCP_INVALID_UTF8, DWCP_INVALID_ARGUMENT, DWCP_INVALID_URI,
        DWCP_RESOLVE_FAILED,
        DWCP_CONNECT_FAILED, DWCP_HANDSHAKE_FAILED, DWCP_LISTEN_FAILED,
        DWCP_SESSION_FAILED, DWCP_CANCELLED, DWCP_TOO_MANY_CHANNELS,
        DWCP_FINISHED, DWCP_IO, DWCP_PANIC,
    };
    size_t i;

    CHECK(dwcp_version() != NULL);
    CHECK(strlen(dwcp_version()) > 0);
    for (i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        const char *s = dwcp_result_str(codes[i]);
        CHECK(s != NULL && strlen(s) > 0);
        CHECK(strcmp(s, "unknown dwcp result code") != 0);
    }
    CHECK(strcmp(dwcp_result_str(0), "unknown dwcp result code") == 0);
    CHECK(strcmp(dwcp_result_str(7999), "unknown dwcp result code") == 0);
    CHECK(strcmp(dwcp_result_str(UINT32_MAX), "unknown dwcp result code") == 0);
}

static void test_uri_parse(void)
{
    static const struct {
        const char *uri;
        const char *message; /* substring of the error */
    } bad[] = {
        { "", "does not start with 'dwcp:'" },
        { "tcp:127.0.0.1:4444", "does not start with 'dwcp:'" },
        { "dwcp:", "no ':PORT'" },
        { "dwcp:127.0.0.1", "no ':PORT'" },
        { "dwcp://127.0.0.1:4444", "without '//'" },
        { "dwcp::4444", "host is empty" },
        { "dwcp:127.0.0.1:port", "port 'port'" },
        { "dwcp:127.0.0.1:70000", "port '70000'" },
        { "dwcp:::1:4444", "brackets" },
        { "dwcp:[::1:4444", "closing ']'" },
        { "dwcp:bad host:1", "not a valid host name" },
        { "dwcp:h:1?streams=0", "streams = 0 is out of range" },
        { "dwcp:h:1?streams=999", "streams" },
        { "dwcp:h:1?codec=gzip", "codec = gzip is out of range" },
        { "dwcp:h:1?codec=zstd:99", "codec = zstd:99 is out of range" },
        { "dwcp:h:1?colour=blue", "unknown parameter 'colour'" },
        { "dwcp:h:1?streams=2&streams=2", "given twice" },
        { "dwcp:h:1?streams", "no value" },
        { "dwcp:h:1?streams=", "empty value" },
        { "dwcp:h:1?streams=4&", "empty parameter" },
        { "dwcp:h:1?window=0", "window = 0 is out of range" },
        { "dwcp:h:1?name=a/b", "name" },
    };
    char err[256];
    size_t i;

    CHECK_RC(dwcp_uri_parse("dwcp:127.0.0.1:4444", err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_uri_parse("dwcp:example.org:1?streams=8&codec=zstd:3&"
                            "workers=2&window=64&dedup=0&name=vm-1&"
                            "connect-timeout=5&idle-timeout=30",
                            err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_uri_parse("dwcp:[::1]:4444?codec=none", NULL, 0), DWCP_OK);
    CHECK_RC(dwcp_uri_parse("dwcp:0.0.0.0:0", NULL, 0), DWCP_OK);

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        CHECK_RC(dwcp_uri_parse(bad[i].uri, err, sizeof(err)), DWCP_INVALID_URI);
        if (!strstr(err, bad[i].message)) {
            failures++;
            fprintf(stderr, "uri '%s': message '%s' lacks '%s'\n", bad[i].uri,
                    err, bad[i].message);
        }
    }
    /* NULL and non-UTF-8 arguments */
    CHECK_RC(dwcp_uri_parse(NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(strstr(err, "NULL") != NULL);
    CHECK_RC(dwcp_uri_parse("dwcp:h\xff:1", err, sizeof(err)), DWCP_INVALID_UTF8);
    /* no buffer, or a tiny one: still NUL-terminated, never overrun */
    CHECK_RC(dwcp_uri_parse("nope", NULL, 100), DWCP_INVALID_URI);
    CHECK_RC(dwcp_uri_parse("nope", err, 0), DWCP_INVALID_URI);
    {
        char tiny[6];
        memset(tiny, 'x', sizeof(tiny));
        CHECK_RC(dwcp_uri_parse("nope", tiny, 5), DWCP_INVALID_URI);
        CHECK(tiny[4] == '\0' && strlen(tiny) == 4 && tiny[5] == 'x');
        CHECK_RC(dwcp_uri_parse("nope", tiny, 1), DWCP_INVALID_URI);
        CHECK(tiny[0] == '\0');
    }
}

static void test_null_handles(void)
{
    dwcp_stats st;
    char err[128];
    int fd = -7;
    uint16_t port;
    dwcp_outgoing *o = (dwcp_outgoing *)&fd; /* sentinel: must be reset */
    dwcp_incoming *in = (dwcp_incoming *)&fd;

    CHECK_RC(dwcp_outgoing_new("dwcp:127.0.0.1:1", NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_outgoing_new(NULL, &o, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(o == NULL);
    CHECK_RC(dwcp_outgoing_channel(NULL, &fd, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(fd == -7);
    CHECK_RC(dwcp_outgoing_stats(NULL, &st), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_outgoing_error(NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_outgoing_cancel(NULL, "x"), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_outgoing_free(NULL), DWCP_OK);
    {
        dwcp_channel *ch = (dwcp_channel *)&fd;
        dwcp_iovec v = { "x", 1 };
        size_t n = 7;

        CHECK_RC(dwcp_outgoing_channel_direct(NULL, &fd, &ch, err, sizeof(err)),
                 DWCP_NULL_PARAMETER);
        CHECK(ch == (dwcp_channel *)&fd);
        CHECK_RC(dwcp_channel_writev(NULL, &v, 1, &n, err, sizeof(err)), DWCP_NULL_PARAMETER);
        CHECK(n == 7);
        CHECK_RC(dwcp_channel_shutdown(NULL), DWCP_NULL_PARAMETER);
        CHECK_RC(dwcp_channel_readv(NULL, &v, 1, 0, &n, err, sizeof(err)), DWCP_NULL_PARAMETER);
        CHECK(n == 7);
        CHECK_RC(dwcp_channel_ready_fd(NULL, &fd), DWCP_NULL_PARAMETER);
        CHECK_RC(dwcp_incoming_next_channel_direct(NULL, 0, &fd, &ch, err, sizeof(err)),
                 DWCP_NULL_PARAMETER);
        CHECK(ch == (dwcp_channel *)&fd);
        CHECK_RC(dwcp_channel_free(NULL), DWCP_OK);
        /* a pointer that was never a channel handle */
        CHECK_RC(dwcp_channel_writev((dwcp_channel *)&st, &v, 1, &n, err, sizeof(err)),
                 DWCP_INVALID_HANDLE);
        CHECK_RC(dwcp_channel_free((dwcp_channel *)&st), DWCP_INVALID_HANDLE);
    }

    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1", NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_new(NULL, &in, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(in == NULL);
    CHECK_RC(dwcp_incoming_port(NULL, &port), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_notify_fd(NULL, &fd), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_next_channel(NULL, 0, &fd, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_stats(NULL, &st), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_cancel(NULL, NULL), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_free(NULL), DWCP_OK);
    CHECK(fd == -7);

    /* a pointer that was never a handle */
    CHECK_RC(dwcp_outgoing_stats((dwcp_outgoing *)&st, &st), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_incoming_free((dwcp_incoming *)&st), DWCP_INVALID_HANDLE);
}

static void test_outgoing_failures(void)
{
    dwcp_outgoing *o = NULL;
    char err[512];
    char uri[128];

    CHECK_RC(dwcp_outgoing_new("dwcp:127.0.0.1:1?streams=0", &o, err, sizeof(err)), DWCP_INVALID_URI);
    CHECK(o == NULL);
    CHECK(strstr(err, "streams") != NULL);
    CHECK_RC(dwcp_outgoing_new("dwcp:127.0.0.1:0?insecure=1", &o, err, sizeof(err)), DWCP_INVALID_URI);
    CHECK(strstr(err, "port 0") != NULL);
    CHECK_RC(dwcp_outgoing_new("dwcp:no-such-host.invalid:4444", &o, err, sizeof(err)), DWCP_RESOLVE_FAILED);
    CHECK(o == NULL);

    snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1&streams=2&connect-timeout=2", closed_port());
    CHECK_RC(dwcp_outgoing_new(uri, &o, err, sizeof(err)), DWCP_CONNECT_FAILED);
    CHECK(o == NULL);
    CHECK(strstr(err, "refused") != NULL);

    /* a TCP listener that never answers the hello */
    {
        struct sockaddr_in a;
        socklen_t len = sizeof(a);
        int s = socket(AF_INET, SOCK_STREAM, 0);

        memset(&a, 0, sizeof(a));
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        CHECK(bind(s, (struct sockaddr *)&a, sizeof(a)) == 0);
        CHECK(listen(s, 8) == 0);
        getsockname(s, (struct sockaddr *)&a, &len);
        snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1&streams=1&connect-timeout=1",
                 ntohs(a.sin_port));
        CHECK_RC(dwcp_outgoing_new(uri, &o, err, sizeof(err)), DWCP_HANDSHAKE_FAILED);
        CHECK(o == NULL);
        close(s);
    }
}

static void test_incoming_basics(void)
{
    dwcp_incoming *in = NULL, *in2 = NULL;
    dwcp_stats st;
    char err[512];
    char uri[128];
    uint16_t port = 0;
    int nfd = -1, fd = -7;

    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1&streams=0", &in, err, sizeof(err)), DWCP_INVALID_URI);
    CHECK(in == NULL);
    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1", &in, err, sizeof(err)), DWCP_OK);
    CHECK(in != NULL);
    CHECK_RC(dwcp_incoming_port(in, NULL), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_port(in, &port), DWCP_OK);
    CHECK(port != 0);
    CHECK_RC(dwcp_incoming_notify_fd(in, NULL), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_notify_fd(in, &nfd), DWCP_OK);
    CHECK(nfd >= 0);
    {
        struct pollfd pfd = { nfd, POLLIN, 0 };
        CHECK(poll(&pfd, 1, 0) == 0); /* nothing queued: not readable */
    }
    CHECK_RC(dwcp_incoming_next_channel(in, 0, NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_next_channel(in, 0, &fd, err, sizeof(err)), DWCP_AGAIN);
    CHECK_RC(dwcp_incoming_next_channel(in, 50, &fd, NULL, 0), DWCP_AGAIN);
    CHECK(fd == -7);
    CHECK_RC(dwcp_incoming_stats(in, NULL), DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_stats(in, &st), DWCP_OK);
    CHECK(st.state == DWCP_STATE_LISTENING && st.raw_in == 0);

    /* the port is taken */
    snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1", port);
    CHECK_RC(dwcp_incoming_new(uri, &in2, err, sizeof(err)), DWCP_LISTEN_FAILED);
    CHECK(in2 == NULL);
    CHECK(strstr(err, "in use") != NULL);

    /* wrong kind of handle */
    CHECK_RC(dwcp_outgoing_stats((const dwcp_outgoing *)in, &st), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_outgoing_free((dwcp_outgoing *)in), DWCP_INVALID_HANDLE);

    /* use after cancel */
    CHECK_RC(dwcp_incoming_cancel(in, "test"), DWCP_OK);
    CHECK_RC(dwcp_incoming_cancel(in, NULL), DWCP_OK);
    CHECK_RC(dwcp_incoming_next_channel(in, 0, &fd, err, sizeof(err)), DWCP_CANCELLED);
    CHECK(strstr(err, "test") != NULL);
    CHECK_RC(dwcp_incoming_stats(in, &st), DWCP_OK);

    /* free, then double free and use after free are caught */
    CHECK_RC(dwcp_incoming_free(in), DWCP_OK);
    CHECK_RC(dwcp_incoming_free(in), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_incoming_port(in, &port), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_incoming_next_channel(in, 0, &fd, err, sizeof(err)), DWCP_INVALID_HANDLE);
    CHECK(fd == -7);
}

static int wait_state(dwcp_outgoing *o, dwcp_incoming *in, dwcp_state want)
{
    int i;

    for (i = 0; i < 100; i++) {
        dwcp_stats a, b;
        dwcp_outgoing_stats(o, &a);
        dwcp_incoming_stats(in, &b);
        if (a.state == want && b.state == want) {
            return 1;
        }
        sleep_ms(50);
    }
    return 0;
}

/* Source QEMU side -> destination QEMU side and back, two channels. */
static void test_loopback(const char *params)
{
    enum { N = 3 << 20, BACK = 100000 };
    dwcp_incoming *in = NULL;
    dwcp_outgoing *o = NULL;
    dwcp_stats st;
    unsigned char *out_buf = malloc(N), *in_buf = malloc(N);
    char err[512], uri[256];
    uint16_t port = 0;
    int src[2] = { -1, -1 }, dst[2] = { -1, -1 }, nfd = -1;
    int c;

    fprintf(stderr, "loopback %s\n", params);
    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1&codec=lz4", &in, err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_incoming_port(in, &port), DWCP_OK);
    CHECK_RC(dwcp_incoming_notify_fd(in, &nfd), DWCP_OK);
    snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1&%s", port, params);
    CHECK_RC(dwcp_outgoing_new(uri, &o, err, sizeof(err)), DWCP_OK);
    if (!o || !in) {
        fprintf(stderr, "loopback set-up failed: %s\n", err);
        goto out;
    }
    CHECK_RC(dwcp_outgoing_error(o, err, sizeof(err)), DWCP_OK);
    CHECK(err[0] == '\0');

    for (c = 0; c < 2; c++) {
        struct pollfd pfd = { nfd, POLLIN, 0 };

        CHECK_RC(dwcp_outgoing_channel(o, NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
        CHECK_RC(dwcp_outgoing_channel(o, &src[c], err, sizeof(err)), DWCP_OK);
        CHECK(src[c] >= 0);
        fill(out_buf, N, (unsigned)c + 1);
        CHECK(write_all(src[c], out_buf, N) == 0);
        /* the notification fd becomes readable once the channel arrives */
        CHECK(poll(&pfd, 1, 5000) == 1);
        CHECK_RC(dwcp_incoming_next_channel(in, 5000, &dst[c], err, sizeof(err)), DWCP_OK);
        CHECK(dst[c] >= 0);
        memset(in_buf, 0xaa, N);
        CHECK(read_all(dst[c], in_buf, N) == 0);
        CHECK(memcmp(in_buf, out_buf, N) == 0);
        /* the return path: destination -> source on the same channel */
        fill(out_buf, BACK, 100 + (unsigned)c);
        CHECK(write_all(dst[c], out_buf, BACK) == 0);
        CHECK(read_all(src[c], in_buf, BACK) == 0);
        CHECK(memcmp(in_buf, out_buf, BACK) == 0);
    }
    CHECK_RC(dwcp_outgoing_stats(o, NULL), DWCP_NULL_PARAMETER);
    /* counters move just after the bytes are handed over: let them settle */
    for (c = 0; c < 100; c++) {
        CHECK_RC(dwcp_outgoing_stats(o, &st), DWCP_OK);
        if (st.raw_in == 2u * BACK) {
            break;
        }
        sleep_ms(10);
    }
    CHECK(st.state == DWCP_STATE_RUNNING);
    CHECK(st.channels == 2);
    CHECK(st.raw_out == 2u * N);
    CHECK(st.raw_in == 2u * BACK);
    if (strcmp(st.codec, "raw") == 0) {
        /* raw frames: the bytes themselves plus a header per frame */
        CHECK(st.wire_out > st.raw_out && st.wire_out < st.raw_out + st.raw_out / 100);
    } else {
        CHECK(st.wire_out > 0 && st.wire_out < st.raw_out); /* zero pages compress */
    }
    CHECK(st.elapsed_ms < 60000);
    fprintf(stderr, "  out: streams=%u codec=%s raw=%llu wire=%llu rtt=%uus\n",
            st.streams, st.codec, (unsigned long long)st.raw_out,
            (unsigned long long)st.wire_out, st.rtt_us);
    for (c = 0; c < 100; c++) {
        CHECK_RC(dwcp_incoming_stats(in, &st), DWCP_OK);
        if (st.raw_in == 2u * N) {
            break;
        }
        sleep_ms(10);
    }
    CHECK(st.state == DWCP_STATE_RUNNING);
    CHECK(st.raw_in == 2u * N);

    /* both QEMUs close: the session completes on both sides */
    for (c = 0; c < 2; c++) {
        unsigned char b;
        close(src[c]);
        src[c] = -1;
        CHECK(read(dst[c], &b, 1) == 0); /* EOF reaches the destination */
        close(dst[c]);
        dst[c] = -1;
    }
    CHECK(wait_state(o, in, DWCP_STATE_COMPLETED));
    CHECK_RC(dwcp_outgoing_channel(o, &src[0], err, sizeof(err)), DWCP_FINISHED);

out:
    for (c = 0; c < 2; c++) {
        if (src[c] >= 0) {
            close(src[c]);
        }
        if (dst[c] >= 0) {
            close(dst[c]);
        }
    }
    CHECK_RC(dwcp_outgoing_free(o), DWCP_OK);
    CHECK_RC(dwcp_incoming_free(in), DWCP_OK);
    free(out_buf);
    free(in_buf);
}

/*
 * Direct channels: the source hands its bytes over with
 * dwcp_channel_writev() (vectored, several calls); the destination reads
 * them from its socket; the return path comes back on the source's fd;
 * dwcp_channel_free() is the end of stream. A second channel is shut down
 * while its writer is blocked for credit.
 */
static dwcp_result shut_rc;

/* Thread: shuts a channel down while the main thread is blocked writing. */
static void *shut_later(void *ch)
{
    sleep_ms(300);
    shut_rc = dwcp_channel_shutdown(ch);
    return NULL;
}

static void test_direct(const char *params)
{
    enum { N = 3 << 20, BACK = 100000, PIECES = 7 };
    dwcp_incoming *in = NULL;
    dwcp_outgoing *o = NULL;
    dwcp_channel *ch = NULL, *ch2 = NULL;
    dwcp_stats st;
    dwcp_iovec iov[PIECES + 1];
    unsigned char *out_buf = malloc(N), *in_buf = malloc(N), b;
    char err[512], uri[256];
    uint16_t port = 0;
    int src = -1, dst = -1, src2 = -1, fd = -7;
    size_t off = 0, n, i;

    fprintf(stderr, "direct %s\n", params);
    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1", &in, err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_incoming_port(in, &port), DWCP_OK);
    snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1&%s", port, params);
    CHECK_RC(dwcp_outgoing_new(uri, &o, err, sizeof(err)), DWCP_OK);
    if (!o || !in) {
        fprintf(stderr, "direct set-up failed: %s\n", err);
        goto out;
    }
    CHECK_RC(dwcp_outgoing_channel_direct(o, &src, NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(src == -1);
    CHECK_RC(dwcp_outgoing_channel_direct(o, NULL, &ch, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(ch == NULL);
    CHECK_RC(dwcp_outgoing_channel_direct(o, &src, &ch, err, sizeof(err)), DWCP_OK);
    CHECK(src >= 0 && ch != NULL);
    if (!ch) {
        goto out;
    }
    fill(out_buf, N, 42);
    /* empty writes, then the data in uneven pieces over several calls */
    CHECK_RC(dwcp_channel_writev(ch, NULL, 0, &n, err, sizeof(err)), DWCP_OK);
    CHECK(n == 0);
    CHECK_RC(dwcp_channel_writev(ch, NULL, 1, &n, err, sizeof(err)), DWCP_NULL_PARAMETER);
    iov[0].base = NULL;
    iov[0].len = 5;
    CHECK_RC(dwcp_channel_writev(ch, iov, 1, &n, err, sizeof(err)), DWCP_NULL_PARAMETER);
    CHECK(strstr(err, "iov[0]") != NULL);
    while (off < N) {
        size_t total = 0;

        for (i = 0; i < PIECES && off + total < N; i++) {
            size_t len = 1 + (off * 7 + i * 4093) % 300000;

            if (len > N - off - total) {
                len = N - off - total;
            }
            iov[i].base = out_buf + off + total;
            iov[i].len = len;
            total += len;
        }
        iov[i].base = NULL; /* zero-length entries may be NULL */
        iov[i].len = 0;
        n = 0;
        CHECK_RC(dwcp_channel_writev(ch, iov, i + 1, i % 2 ? &n : NULL, err, sizeof(err)),
                 DWCP_OK);
        CHECK(i % 2 == 0 || n == total);
        /*
         * Take the channel once it exists: until then its bytes wait in
         * libdwcp, within the window; after, they go on into the socket.
         */
        if (off == 0) {
            CHECK_RC(dwcp_incoming_next_channel(in, 5000, &dst, err, sizeof(err)), DWCP_OK);
            CHECK(dst >= 0);
        }
        off += total;
    }
    memset(in_buf, 0xaa, N);
    CHECK(read_all(dst, in_buf, N) == 0);
    CHECK(memcmp(in_buf, out_buf, N) == 0);
    /* the return path arrives on the source's fd */
    fill(out_buf, BACK, 7);
    CHECK(write_all(dst, out_buf, BACK) == 0);
    CHECK(read_all(src, in_buf, BACK) == 0);
    CHECK(memcmp(in_buf, out_buf, BACK) == 0);

    /*
     * A second channel nobody reads on the other side: with a small window
     * its writer blocks for credit until the channel is shut down.
     */
    CHECK_RC(dwcp_outgoing_channel_direct(o, &src2, &ch2, err, sizeof(err)), DWCP_OK);
    if (ch2) {
        pthread_t t;
        dwcp_result r = DWCP_OK;

        CHECK(pthread_create(&t, NULL, shut_later, ch2) == 0);
        iov[0].base = out_buf;
        iov[0].len = N;
        /* 64 x 3 MiB is far more than the window and socket buffers hold */
        for (i = 0; i < 64 && r == DWCP_OK; i++) {
            r = dwcp_channel_writev(ch2, iov, 1, NULL, err, sizeof(err));
        }
        CHECK(i < 64);
        CHECK_RC(r, DWCP_CANCELLED);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_RC(shut_rc, DWCP_OK);
        CHECK_RC(dwcp_channel_shutdown(ch2), DWCP_OK);
        CHECK_RC(dwcp_channel_writev(ch2, iov, 1, NULL, err, sizeof(err)), DWCP_CANCELLED);
        /* like shutdown(2): the peer reads what was taken, then EOF */
        {
            int dst2 = -1;
            size_t got = 0;
            ssize_t r2 = -1;

            CHECK_RC(dwcp_incoming_next_channel(in, 5000, &dst2, err, sizeof(err)), DWCP_OK);
            while (dst2 >= 0 && (r2 = read(dst2, in_buf, N)) > 0) {
                got += (size_t)r2;
            }
            CHECK(r2 == 0); /* end of file, not an error */
            CHECK(got > 0);
            if (dst2 >= 0) {
                close(dst2);
            }
        }
        CHECK_RC(dwcp_channel_free(ch2), DWCP_OK);
        CHECK_RC(dwcp_channel_free(ch2), DWCP_INVALID_HANDLE);
    }

    /* a channel handle is not a session handle, nor the reverse */
    CHECK_RC(dwcp_outgoing_stats((const dwcp_outgoing *)(const void *)ch, &st),
             DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_channel_shutdown((const dwcp_channel *)(const void *)o), DWCP_INVALID_HANDLE);
    /* end of stream: the destination reads EOF after the data */
    CHECK_RC(dwcp_channel_free(ch), DWCP_OK);
    CHECK_RC(dwcp_channel_writev(ch, iov, 1, NULL, err, sizeof(err)), DWCP_INVALID_HANDLE);
    CHECK(read(dst, &b, 1) == 0);
    CHECK_RC(dwcp_outgoing_stats(o, &st), DWCP_OK);
    CHECK(st.channels == 2);
    CHECK(st.raw_out >= (uint64_t)N);
    CHECK(st.raw_in == BACK);
    CHECK(fd == -7);

out:
    if (src >= 0) {
        close(src);
    }
    if (src2 >= 0) {
        close(src2);
    }
    if (dst >= 0) {
        close(dst);
    }
    CHECK_RC(dwcp_outgoing_cancel(o, "test over"), DWCP_OK);
    CHECK_RC(dwcp_outgoing_free(o), DWCP_OK);
    CHECK_RC(dwcp_incoming_free(in), DWCP_OK);
    free(out_buf);
    free(in_buf);
}

typedef struct WriteJob {
    dwcp_channel *ch;
    const unsigned char *p;
    size_t n;
    dwcp_result rc;
} WriteJob;

/* Thread: writes the job's bytes, then frees the channel (end of stream). */
static void *write_then_free(void *opaque)
{
    WriteJob *job = opaque;
    dwcp_iovec v = { job->p, job->n };
    char err[256];

    job->rc = dwcp_channel_writev(job->ch, &v, 1, NULL, err, sizeof(err));
    if (job->rc != DWCP_OK) {
        fprintf(stderr, "writer: %s\n", err);
    }
    dwcp_channel_free(job->ch);
    return NULL;
}

/*
 * Reads @rx to its end the way QEMU's coroutine does: non-blocking reads
 * into odd-sized pieces, waiting on @ready in between. Returns the bytes
 * read into @buf (at most @cap; one more would land in @spare).
 */
static size_t drain_nonblocking(dwcp_channel *rx, int ready, unsigned char *buf, size_t cap,
                                unsigned char *spare, int *waits)
{
    dwcp_iovec iov[3];
    char err[512];
    size_t off = 0, n = 0;

    for (;;) {
        dwcp_result r;

        iov[0].base = buf + off;
        iov[0].len = off + 1000 <= cap ? 1000 : cap - off;
        iov[1].base = buf + off + iov[0].len;
        iov[1].len = cap - off - iov[0].len;
        iov[2].base = spare; /* past the end: only a stream too long lands here */
        iov[2].len = 1;
        r = dwcp_channel_readv(rx, iov, 3, DWCP_READ_NONBLOCK, &n, err, sizeof(err));
        if (r == DWCP_AGAIN) {
            struct pollfd pfd = { ready, POLLIN, 0 };

            (*waits)++;
            if (poll(&pfd, 1, 10000) != 1) {
                CHECK(!"no wake-up within 10 s");
                return off;
            }
            continue;
        }
        CHECK_RC(r, DWCP_OK);
        if (r != DWCP_OK || n == 0) {
            return off;
        }
        off += n;
        CHECK(off <= cap);
    }
}

/*
 * Direct on both sides: the source writes with dwcp_channel_writev(), the
 * destination reads with dwcp_channel_readv() the way QEMU's coroutine
 * does (non-blocking, waiting on the readiness fd), peeks at the first
 * bytes as QEMU does to tell channels apart, and answers on the return
 * path socket.
 */
static void test_direct_receive(const char *params)
{
    enum { N = 3 << 20, BACK = 50000 };
    dwcp_incoming *in = NULL;
    dwcp_outgoing *o = NULL;
    dwcp_channel *ch = NULL, *rx = NULL;
    dwcp_stats st;
    dwcp_iovec iov[3];
    unsigned char *out_buf = malloc(N), *in_buf = malloc(N), head[8];
    char err[512], uri[256];
    uint16_t port = 0;
    int src = -1, rp = -1, ready = -1, waits = 0;
    size_t off = 0, n = 0;

    fprintf(stderr, "direct receive %s\n", params);
    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1", &in, err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_incoming_port(in, &port), DWCP_OK);
    snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1&%s", port, params);
    CHECK_RC(dwcp_outgoing_new(uri, &o, err, sizeof(err)), DWCP_OK);
    if (!o || !in) {
        goto out;
    }
    CHECK_RC(dwcp_outgoing_channel_direct(o, &src, &ch, err, sizeof(err)), DWCP_OK);
    if (!ch) {
        goto out;
    }
    fill(out_buf, N, 9);
    iov[0].base = out_buf;
    iov[0].len = 4;
    CHECK_RC(dwcp_channel_writev(ch, iov, 1, NULL, err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_incoming_next_channel_direct(in, 5000, &rp, NULL, err, sizeof(err)),
             DWCP_NULL_PARAMETER);
    CHECK_RC(dwcp_incoming_next_channel_direct(in, 5000, &rp, &rx, err, sizeof(err)), DWCP_OK);
    CHECK(rp >= 0 && rx != NULL);
    if (!rx) {
        goto out;
    }
    /* the wrong half of a channel is refused, naming why */
    CHECK_RC(dwcp_channel_writev(rx, iov, 1, NULL, err, sizeof(err)), DWCP_INVALID_ARGUMENT);
    CHECK(strstr(err, "receiving") != NULL);
    iov[0].base = head;
    iov[0].len = sizeof(head);
    CHECK_RC(dwcp_channel_readv(ch, iov, 1, 0, &n, err, sizeof(err)), DWCP_INVALID_ARGUMENT);
    CHECK_RC(dwcp_channel_ready_fd(ch, &ready), DWCP_INVALID_ARGUMENT);
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, 0x80, &n, err, sizeof(err)), DWCP_INVALID_ARGUMENT);
    CHECK(strstr(err, "flags") != NULL);
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, 0, NULL, err, sizeof(err)), DWCP_NULL_PARAMETER);
    iov[1].base = head + 2; /* overlaps iov[0] */
    iov[1].len = 2;
    CHECK_RC(dwcp_channel_readv(rx, iov, 2, 0, &n, err, sizeof(err)), DWCP_INVALID_ARGUMENT);
    CHECK(strstr(err, "overlap") != NULL);
    CHECK_RC(dwcp_channel_ready_fd(rx, &ready), DWCP_OK);
    CHECK(ready >= 0);

    /* peek: the first 4 bytes, twice, taking nothing */
    iov[0].len = 4;
    n = 0;
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, DWCP_READ_PEEK, &n, err, sizeof(err)), DWCP_OK);
    CHECK(n == 4 && memcmp(head, out_buf, 4) == 0);
    memset(head, 0, sizeof(head));
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, DWCP_READ_PEEK | DWCP_READ_NONBLOCK, &n, err,
                                sizeof(err)), DWCP_OK);
    CHECK(n == 4 && memcmp(head, out_buf, 4) == 0);

    /* the rest from a writer thread (more than the window), then the end */
    {
        WriteJob job = { ch, out_buf + 4, N - 4, DWCP_PANIC };
        pthread_t t;

        CHECK(pthread_create(&t, NULL, write_then_free, &job) == 0);
        memset(in_buf, 0xaa, N);
        off = drain_nonblocking(rx, ready, in_buf, N, head, &waits);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK_RC(job.rc, DWCP_OK);
        ch = NULL;
    }
    CHECK(off == N);
    CHECK(memcmp(in_buf, out_buf, N) == 0);
    fprintf(stderr, "  %zu bytes read, %d waits\n", off, waits);
    /* after the end of stream, reads keep saying so */
    iov[0].base = head;
    iov[0].len = 1;
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, 0, &n, err, sizeof(err)), DWCP_OK);
    CHECK(n == 0);

    /* the return path: written on the socket, read on the source's fd */
    fill(out_buf, BACK, 3);
    CHECK(write_all(rp, out_buf, BACK) == 0);
    CHECK(read_all(src, in_buf, BACK) == 0);
    CHECK(memcmp(in_buf, out_buf, BACK) == 0);
    CHECK_RC(dwcp_incoming_stats(in, &st), DWCP_OK);
    CHECK(st.raw_in == (uint64_t)N);

    /* shutdown: reads then return end of stream */
    CHECK_RC(dwcp_channel_shutdown(rx), DWCP_OK);
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, 0, &n, err, sizeof(err)), DWCP_OK);
    CHECK(n == 0);
    CHECK_RC(dwcp_channel_free(rx), DWCP_OK);
    CHECK_RC(dwcp_channel_free(rx), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_channel_readv(rx, iov, 1, 0, &n, err, sizeof(err)), DWCP_INVALID_HANDLE);
    rx = NULL;

out:
    dwcp_channel_free(ch);
    dwcp_channel_free(rx);
    if (src >= 0) {
        close(src);
    }
    if (rp >= 0) {
        close(rp);
    }
    CHECK_RC(dwcp_outgoing_cancel(o, "test over"), DWCP_OK);
    CHECK_RC(dwcp_outgoing_free(o), DWCP_OK);
    CHECK_RC(dwcp_incoming_free(in), DWCP_OK);
    free(out_buf);
    free(in_buf);
}

/* Cancel in the middle of a transfer: both sides see it. */
static void test_cancel(void)
{
    dwcp_incoming *in = NULL;
    dwcp_outgoing *o = NULL;
    dwcp_stats st;
    char err[512], uri[128];
    uint16_t port = 0;
    int src = -1, dst = -1, fd2 = -7;
    unsigned char buf[4096];
    ssize_t r;

    memset(buf, 1, sizeof(buf));
    CHECK_RC(dwcp_incoming_new("dwcp:127.0.0.1:0?insecure=1", &in, err, sizeof(err)), DWCP_OK);
    CHECK_RC(dwcp_incoming_port(in, &port), DWCP_OK);
    snprintf(uri, sizeof(uri), "dwcp:127.0.0.1:%u?insecure=1&streams=2", port);
    CHECK_RC(dwcp_outgoing_new(uri, &o, err, sizeof(err)), DWCP_OK);
    if (!o || !in) {
        goto out;
    }
    CHECK_RC(dwcp_outgoing_channel(o, &src, err, sizeof(err)), DWCP_OK);
    CHECK(write_all(src, buf, sizeof(buf)) == 0);
    CHECK_RC(dwcp_incoming_next_channel(in, 5000, &dst, err, sizeof(err)), DWCP_OK);
    CHECK(read_all(dst, buf, sizeof(buf)) == 0);

    CHECK_RC(dwcp_outgoing_cancel(o, "operator said so"), DWCP_OK);
    CHECK_RC(dwcp_outgoing_cancel(o, NULL), DWCP_OK);
    /* use after cancel: refused with its own code, the reason is kept */
    CHECK_RC(dwcp_outgoing_channel(o, &fd2, err, sizeof(err)), DWCP_CANCELLED);
    CHECK(fd2 == -7);
    CHECK_RC(dwcp_outgoing_error(o, err, sizeof(err)), DWCP_CANCELLED);
    CHECK(strstr(err, "operator said so") != NULL);
    CHECK_RC(dwcp_outgoing_stats(o, &st), DWCP_OK);
    CHECK(st.state == DWCP_STATE_FAILED);
    /* the destination's channel is cut (EOF or error), not left hanging */
    {
        struct pollfd pfd = { dst, POLLIN, 0 };
        CHECK(poll(&pfd, 1, 5000) == 1);
        r = read(dst, buf, sizeof(buf));
        CHECK(r <= 0);
    }
    CHECK(wait_state(o, in, DWCP_STATE_FAILED));

out:
    if (src >= 0) {
        close(src);
    }
    if (dst >= 0) {
        close(dst);
    }
    CHECK_RC(dwcp_outgoing_free(o), DWCP_OK);
    CHECK_RC(dwcp_outgoing_free(o), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_outgoing_stats(o, &st), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_outgoing_cancel(o, NULL), DWCP_INVALID_HANDLE);
    CHECK_RC(dwcp_incoming_free(in), DWCP_OK);
}

int main(void)
{
    test_version_and_results();
    test_uri_parse();
    test_null_handles();
    test_outgoing_failures();
    test_incoming_basics();
    test_loopback("streams=1&codec=none");
    test_loopback("streams=2&codec=raw");
    test_loopback("streams=2");
    test_loopback("streams=8&codec=lz4");
    test_loopback("streams=4&codec=zstd:3&workers=2");
    test_direct("streams=2&window=2");
    test_direct("streams=4&codec=lz4&window=2");
    test_direct_receive("streams=2");
    test_direct_receive("streams=4&codec=zstd:3&window=2");
    test_cancel();
    printf("%s: %d checks, %d failed\n", failures ? "FAIL" : "PASS", checks, failures);
    return failures ? 1 : 0;
}
