/*
 * kvmha lab guest: the heartbeat writer of a real QEMU guest (vm_driver = "libvirt").
 *
 * The guest's only job. Every 100 ms it writes one line
 *     <unix_ms> <host> <vm> <boot_id> <seq>\n
 * into its virtio disk /dev/vda (the file vms/<vm>/disk.raw on the lab's shared
 * storage), the same format as the lab process VM (ARCHITECTURE.md section 9).
 *
 * Layout of the disk: regions of 1 MiB, one per boot. A boot takes the first region
 * whose first byte is NUL, so two writers of one disk (split brain) never overwrite
 * each other's lines and the checker sees both. Inside its region a boot rewrites its
 * current 4 KiB block (O_DIRECT, then fdatasync) with the new line appended; the rest
 * of the block is NUL padding, which readers skip.
 *
 * Time: a TCG guest's clock starts from the RTC (whole seconds) and drifts, so the
 * line's unix_ms is the host's: before each line the guest asks the lab's clock
 * server over a virtio-serial port (/dev/vport0p1), "t <n>\n", and gets
 * "<unix_ms> <host> t <n>\n".
 * The host name comes from the same answer, as the domain XML is the same on every
 * host. Without an answer within 30 ms the guest uses its own clock plus the last
 * offset it learned; before the first answer it writes nothing.
 *
 * Built static by the lab (cc -static) from this file; no libc beyond POSIX.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define BLOCK 4096
#define REGION (1024 * 1024)
#define INTERVAL_NS 100000000LL
#define ASK_TIMEOUT_MS 30

static char host[64];
static long long offset_ms; /* host clock minus guest clock, from the last answer */
static unsigned long long question; /* the number of the last question to the clock */

static long long clock_ms(clockid_t clock) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void say(const char *text) {
    int console = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (console >= 0) {
        dprintf(console, "kvmha-guest: %s\n", text);
        close(console);
    }
}

/* Reads "<field>=value" from the kernel command line into out. */
static int cmdline_value(const char *field, char *out, size_t size) {
    char text[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0) return -1;
    ssize_t length = read(fd, text, sizeof text - 1);
    close(fd);
    if (length <= 0) return -1;
    text[length] = 0;
    size_t field_length = strlen(field);
    for (char *word = strtok(text, " \n"); word; word = strtok(NULL, " \n")) {
        if (strncmp(word, field, field_length) == 0 && word[field_length] == '=') {
            snprintf(out, size, "%s", word + field_length + 1);
            return 0;
        }
    }
    return -1;
}

static int open_clock(void) {
    return open("/dev/vport0p1", O_RDWR | O_NONBLOCK | O_NOCTTY);
}

/* Asks the host for its time; 0 and *unix_ms on an answer. */
static int ask_host(int *port, long long *unix_ms) {
    char answer[160];
    if (*port < 0) *port = open_clock();
    if (*port < 0) return -1;
    char ask[32];
    while (read(*port, answer, sizeof answer) > 0) {
        /* a late answer to an earlier question: drop it */
    }
    /* Numbered, so a late answer to an earlier question is never taken for this one. */
    int ask_length = snprintf(ask, sizeof ask, "t %llu\n", ++question);
    if (write(*port, ask, (size_t)ask_length) != ask_length) return -1;
    size_t have = 0;
    long long deadline = clock_ms(CLOCK_MONOTONIC) + ASK_TIMEOUT_MS;
    for (;;) {
        char *end;
        while ((end = memchr(answer, '\n', have)) != NULL) {
            char name[64];
            unsigned long long echoed = 0;
            *end = 0;
            if (sscanf(answer, "%lld %63s t %llu", unix_ms, name, &echoed) == 3 && echoed == question) {
                snprintf(host, sizeof host, "%s", name);
                offset_ms = *unix_ms - clock_ms(CLOCK_REALTIME);
                return 0;
            }
            /* an earlier question's answer: drop it, look at the next line */
            size_t rest = have - (size_t)(end + 1 - answer);
            memmove(answer, end + 1, rest);
            have = rest;
        }
        if (have >= sizeof answer) return -1;
        long long left = deadline - clock_ms(CLOCK_MONOTONIC);
        if (left <= 0) return -1;
        struct pollfd wait = {.fd = *port, .events = POLLIN};
        if (poll(&wait, 1, (int)left) <= 0) return -1;
        ssize_t got = read(*port, answer + have, sizeof answer - have);
        if (got <= 0) return -1;
        have += (size_t)got;
    }
}

static void sleep_until(struct timespec *next) {
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL) == EINTR) {
    }
}

static void advance(struct timespec *next) {
    long long ns = next->tv_nsec + INTERVAL_NS;
    next->tv_sec += ns / 1000000000LL;
    next->tv_nsec = ns % 1000000000LL;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    /* Fell behind by more than a tick (a stopped host resumes): no catch-up burst. */
    if (now.tv_sec > next->tv_sec + 1) *next = now;
}

int main(void) {
    char vm[128], boot_id[64] = "unknown";
    if (cmdline_value("kvmha_vm", vm, sizeof vm) != 0) {
        say("no kvmha_vm= on the kernel command line");
        return 1;
    }
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY);
    if (fd >= 0) {
        ssize_t length = read(fd, boot_id, sizeof boot_id - 1);
        boot_id[length > 0 ? length : 0] = 0;
        boot_id[strcspn(boot_id, "\n")] = 0;
        close(fd);
    }
    int disk;
    while ((disk = open("/dev/vda", O_RDWR | O_DIRECT | O_SYNC)) < 0) {
        say("waiting for /dev/vda");
        sleep(1);
    }
    unsigned long long disk_bytes = 0;
    if (ioctl(disk, BLKGETSIZE64, &disk_bytes) != 0 || disk_bytes < REGION) {
        say("/dev/vda is smaller than one region");
        return 1;
    }
    char *block;
    if (posix_memalign((void **)&block, BLOCK, BLOCK) != 0) return 1;
    long long position = -1;
    for (unsigned long long region = 0; region + REGION <= disk_bytes; region += REGION) {
        if (pread(disk, block, BLOCK, (off_t)region) != BLOCK) {
            say("reading /dev/vda failed");
            return 1;
        }
        if (block[0] == 0) {
            position = (long long)region;
            break;
        }
    }
    if (position < 0) {
        say("every region of /dev/vda is used");
        return 1;
    }
    memset(block, 0, BLOCK);
    size_t fill = 0;
    int port = -1;
    unsigned long long seq = 0;
    char text[256];
    snprintf(text, sizeof text, "vm %s boot %s writing at byte %lld", vm, boot_id, position);
    say(text);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;; advance(&next), sleep_until(&next)) {
        long long unix_ms;
        int had_host = host[0] != 0;
        int answered = ask_host(&port, &unix_ms) == 0;
        if (answered && !had_host) {
            snprintf(text, sizeof text, "first clock answer (question %llu): on %s", question, host);
            say(text);
        }
        if (!answered) {
            if (host[0] == 0) continue; /* never heard the host: nothing honest to write */
            unix_ms = clock_ms(CLOCK_REALTIME) + offset_ms;
        }
        int length = snprintf(text, sizeof text, "%lld %s %s %s %llu\n", unix_ms, host, vm, boot_id, seq);
        seq++;
        if (length <= 0 || length >= (int)sizeof text) continue;
        if (fill + (size_t)length > BLOCK) {
            position += BLOCK;
            fill = 0;
            memset(block, 0, BLOCK);
        }
        if ((unsigned long long)position + BLOCK > disk_bytes) {
            say("the disk is full");
            pause();
        }
        memcpy(block + fill, text, (size_t)length);
        if (pwrite(disk, block, BLOCK, (off_t)position) == BLOCK && fdatasync(disk) == 0) {
            fill += (size_t)length;
        } else {
            /* Not on the disk: drop the line (a gap), as the process VM does. */
            memset(block + fill, 0, (size_t)length);
        }
    }
}
