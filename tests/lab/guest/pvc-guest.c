/*
 * pvc-guest: the program of the lab's real Linux guest (tests/lab/guest_image.py builds it, static,
 * into the guest's initramfs). The guest's /init sets up the system and then execs it as PID 1.
 *
 * It does four things, in one single-threaded loop:
 *
 *  - ticks: every tick_ms milliseconds it writes one line "<name> <boot> <seq> <monotonic us>\n" to the
 *    virtio console /dev/hvc0, a serial console of its own (in raw mode, one write per tick: one
 *    datagram when the lab backs the console with UDP; a virtio console sends whether or not
 *    anybody listens, where a virtio serial port would hold the writes back). The guest's own clock stands still while QEMU has the guest paused (the
 *    switch-over of a live migration), so the guest cannot see its downtime by itself: whoever
 *    receives the ticks sees it as the largest gap between their arrivals, and the monotonic time
 *    in each tick tells that the guest itself noticed nothing;
 *  - dirtying memory: it writes one word into each of dirty_mib_s * 256 pages (4 KiB) per second,
 *    going round a buffer of dirty_buf_mib MiB, so that a live migration has that much memory to
 *    send again in every pass. Each write is the count of writes so far, and before writing a page
 *    it checks that the page still holds what it wrote there on its last round: a live migration
 *    that lost one of its writes (the target resumed with an old copy of the page) is counted
 *    (lost_writes in "status") and reported on the console, rather than seen only if the kernel
 *    happens to trip over it;
 *  - a command channel on the virtio serial port org.pvc-cluster.guest.0 (one line per command):
 *    "dirty <MiB/s>" sets the dirty rate, "status" answers with the guest's figures, "ping" answers
 *    "pong";
 *  - being init: it reaps orphans, and on SIGUSR2 (busybox `poweroff`, which the ACPI power
 *    button's acpid handler runs) it stops every other process, syncs and powers the machine off;
 *    SIGTERM (busybox `reboot`) reboots it.
 *
 * Settings come from the kernel command line: pvc.name=<name for the ticks> pvc.tick_ms=<1..1000>
 * pvc.dirty_mib_s=<0..100000> pvc.dirty_buf_mib=<1..4096>.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define TICKS_CONSOLE "/dev/hvc0"
#define COMMAND_PORT "org.pvc-cluster.guest.0"
#define PAGE 4096UL
/* After a stall (the vCPU throttled, or starved by the host) at most this much dirtying is made
 * up for, so that the rate stays what was asked for rather than bursting. */
#define MAX_CATCH_UP_NS 50000000LL

static char name[64] = "guest";
static char boot[9] = "0"; /* the start of the kernel's boot_id: tells one boot's ticks from the next's */
static long tick_ms = 5;
static long dirty_mib_s = 0;
static long dirty_buf_mib = 32;

static volatile sig_atomic_t power_request; /* 'p' power off, 'r' reboot */
static volatile sig_atomic_t child_exited;

static int console = -1;

static void say(const char *fmt, ...)
{
	char line[256];
	va_list ap;
	int n = snprintf(line, sizeof line, "pvc-guest: ");
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof line - n, fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof line - 1)
		n = sizeof line - 2;
	line[n++] = '\n';
	if (console >= 0 && write(console, line, n) < 0) {
		/* nothing to report it to */
	}
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long bounded(const char *value, long low, long high, long fallback)
{
	char *end;
	long v = strtol(value, &end, 10);
	if (end == value || *end != '\0' || v < low || v > high)
		return fallback;
	return v;
}

static void read_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return;
	buf[n] = '\0';
	for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
		if (strncmp(tok, "pvc.name=", 9) == 0)
			snprintf(name, sizeof name, "%s", tok + 9);
		else if (strncmp(tok, "pvc.tick_ms=", 12) == 0)
			tick_ms = bounded(tok + 12, 1, 1000, tick_ms);
		else if (strncmp(tok, "pvc.dirty_mib_s=", 16) == 0)
			dirty_mib_s = bounded(tok + 16, 0, 100000, dirty_mib_s);
		else if (strncmp(tok, "pvc.dirty_buf_mib=", 18) == 0)
			dirty_buf_mib = bounded(tok + 18, 1, 4096, dirty_buf_mib);
	}
}

/* The /dev node of the virtio serial port named `port` (devtmpfs names them vportNpM). */
static int open_port(const char *port, int flags)
{
	DIR *dir = opendir("/sys/class/virtio-ports");
	struct dirent *entry;
	int fd = -1;
	if (!dir)
		return -1;
	while (fd < 0 && (entry = readdir(dir))) {
		char path[300], text[128];
		if (entry->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", entry->d_name);
		int nfd = open(path, O_RDONLY);
		ssize_t n = nfd >= 0 ? read(nfd, text, sizeof text - 1) : -1;
		if (nfd >= 0)
			close(nfd);
		if (n <= 0)
			continue;
		text[n] = '\0';
		text[strcspn(text, "\n")] = '\0';
		if (strcmp(text, port) != 0)
			continue;
		snprintf(path, sizeof path, "/dev/%s", entry->d_name);
		fd = open(path, flags | O_CLOEXEC);
	}
	closedir(dir);
	return fd;
}

static void read_boot_id(void)
{
	char text[40];
	int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, text, sizeof text - 1) : -1;
	if (fd >= 0)
		close(fd);
	if (n >= 8)
		snprintf(boot, sizeof boot, "%.8s", text);
}

static void on_signal(int sig)
{
	if (sig == SIGCHLD)
		child_exited = 1;
	else if (sig == SIGUSR2 || sig == SIGUSR1)
		power_request = 'p';
	else if (sig == SIGTERM)
		power_request = 'r';
}

static void reap(void)
{
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

/* A clean power-off: every other process is asked to end and given a moment, the disks are
 * synced, then the machine is powered off (QEMU reports a shutdown by the guest). */
static void power(int request)
{
	say("%s requested: stopping every process", request == 'p' ? "power off" : "reboot");
	kill(-1, SIGTERM);
	int64_t deadline = now_ns() + 500000000LL;
	while (now_ns() < deadline) {
		pid_t pid = waitpid(-1, NULL, WNOHANG);
		if (pid < 0 && errno == ECHILD)
			break;
		if (pid == 0) {
			struct timespec pause = {0, 10000000}; /* poll our children every 10 ms */
			nanosleep(&pause, NULL);
		}
	}
	kill(-1, SIGKILL);
	reap();
	sync();
	say("%s", request == 'p' ? "powering off" : "rebooting");
	reboot(request == 'p' ? RB_POWER_OFF : RB_AUTOBOOT);
	_exit(1); /* reached only if reboot() failed: PID 1 exiting panics the kernel, which stops it too */
}

struct dirtier {
	unsigned char *buf;
	size_t pages;
	size_t next;
	int64_t last_ns;
	double owed; /* pages due but not yet written */
	uint64_t written;
	uint64_t lost; /* pages that did not hold the word written there on the last round */
};

static void dirty(struct dirtier *d, int64_t now)
{
	int64_t elapsed = now - d->last_ns;
	d->last_ns = now;
	if (dirty_mib_s <= 0)
		return;
	if (!d->buf) {
		/* mapped on first use: a guest that dirties nothing needs no room for it */
		void *buf = mmap(NULL, d->pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (buf == MAP_FAILED) {
			say("cannot map %ld MiB to dirty: %s; not dirtying", dirty_buf_mib, strerror(errno));
			dirty_mib_s = 0;
			return;
		}
		d->buf = buf;
	}
	if (elapsed > MAX_CATCH_UP_NS)
		elapsed = MAX_CATCH_UP_NS;
	d->owed += (double)elapsed * dirty_mib_s * (1048576.0 / PAGE) / 1e9;
	while (d->owed >= 1.0) {
		/* Pages are written in turn, so this one last got the count of one round ago (a fresh
		 * anonymous page reads 0). */
		uint64_t *word = (uint64_t *)(d->buf + d->next * PAGE);
		uint64_t expected = d->written >= d->pages ? d->written - d->pages : 0;
		if (*word != expected) {
			if (d->lost++ < 5)
				say("lost write: page %zu of the dirtied buffer holds %llu, not %llu", d->next,
				    (unsigned long long)*word, (unsigned long long)expected);
		}
		*word = d->written;
		d->next = (d->next + 1) % d->pages;
		d->written++;
		d->owed -= 1.0;
	}
}

static void answer(int fd, const char *fmt, ...)
{
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	if (write(fd, line, n) < 0) {
		/* the host went away; the next command comes on a new connection */
	}
}

static void command(int fd, char *line, struct dirtier *d, uint64_t ticks, int64_t max_gap_ns, int64_t started)
{
	char *arg = strchr(line, ' ');
	if (arg)
		*arg++ = '\0';
	if (strcmp(line, "ping") == 0) {
		answer(fd, "pong");
	} else if (strcmp(line, "dirty") == 0 && arg) {
		long rate = bounded(arg, 0, 100000, -1);
		if (rate < 0) {
			answer(fd, "error dirty: %s is not a rate in MiB/s from 0 to 100000", arg);
			return;
		}
		dirty_mib_s = rate;
		say("dirty rate %ld MiB/s", rate);
		answer(fd, "ok dirty %ld", rate);
	} else if (strcmp(line, "status") == 0) {
		answer(fd, "ok name=%s tick_ms=%ld ticks=%llu dirty_mib_s=%ld dirty_buf_mib=%ld dirtied_mib=%llu "
		       "lost_writes=%llu max_tick_gap_us=%lld uptime_ms=%lld",
		       name, tick_ms, (unsigned long long)ticks, dirty_mib_s, dirty_buf_mib,
		       (unsigned long long)(d->written * PAGE >> 20), (unsigned long long)d->lost,
		       (long long)(max_gap_ns / 1000),
		       (long long)((now_ns() - started) / 1000000));
	} else {
		answer(fd, "error unknown command %s (accepted: ping, status, dirty <MiB/s>)", line);
	}
}

int main(void)
{
	console = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGINT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);

	read_cmdline();
	read_boot_id();
	struct dirtier d = {0};
	d.pages = (size_t)dirty_buf_mib * (1048576 / PAGE);
	int ticks_fd = open(TICKS_CONSOLE, O_WRONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	struct termios raw;
	if (ticks_fd >= 0 && tcgetattr(ticks_fd, &raw) == 0) {
		cfmakeraw(&raw); /* no "\r\n" for "\n", nothing buffered by the line discipline */
		tcsetattr(ticks_fd, TCSANOW, &raw);
	}
	int command_fd = open_port(COMMAND_PORT, O_RDWR | O_NONBLOCK);
	say("ready name=%s boot=%s tick_ms=%ld dirty_mib_s=%ld dirty_buf_mib=%ld ticks_console=%s command_port=%s", name, boot, tick_ms,
	    dirty_mib_s, dirty_buf_mib, ticks_fd >= 0 ? "yes" : "no", command_fd >= 0 ? "yes" : "no");

	char cmd[256];
	size_t cmd_len = 0;
	uint64_t seq = 0;
	const int64_t started = now_ns();
	const int64_t period = tick_ms * 1000000LL;
	int64_t next_tick = started, last_tick = 0, max_gap = 0, command_retry = 0;
	d.last_ns = started;
	for (;;) {
		if (power_request)
			power(power_request);
		if (child_exited) {
			child_exited = 0;
			reap();
		}
		int64_t now = now_ns();
		if (now >= next_tick) {
			char line[128];
			int n = snprintf(line, sizeof line, "%s %s %llu %lld\n", name, boot, (unsigned long long)seq++,
					 (long long)(now / 1000));
			if (ticks_fd >= 0 && write(ticks_fd, line, n) < 0) {
				/* the host end is not there (yet): this tick is lost, the next one is tried */
			}
			if (last_tick && now - last_tick > max_gap)
				max_gap = now - last_tick;
			last_tick = now;
			next_tick += period;
			if (next_tick <= now) /* late (stalled): keep the period from now on */
				next_tick = now + period;
		}
		dirty(&d, now);

		/* Wait for the next tick, or for a command. While the host side of the command port is not
		 * connected, poll() reports POLLHUP at once: then the port is left out for 100 ms. */
		struct pollfd pfd = {command_fd, POLLIN, 0};
		int watch = command_fd >= 0 && now >= command_retry;
		int64_t wait_ns = next_tick - now_ns();
		int timeout = wait_ns > 0 ? (int)((wait_ns + 999999) / 1000000) : 0;
		/* While dirtying, never idle: poll without waiting. Under the lab's QEMU/TCG a kernel
		 * path that wakes the CPU from idle writes through TLB entries older than the live
		 * migration's last dirty-bitmap sync, and such writes can be lost (GUEST_KERNEL_WORKAROUND
		 * in tests/lab/guests.py); a guest that never idles enters its kernel only from user
		 * space, where page-table isolation's CR3 reload flushes those entries first. */
		if (dirty_mib_s > 0)
			timeout = 0;
		int ready = poll(&pfd, watch ? 1 : 0, timeout);
		if (ready <= 0 || !watch)
			continue;
		if (pfd.revents & POLLHUP) {
			command_retry = now_ns() + 100000000LL;
			cmd_len = 0;
			continue;
		}
		if (!(pfd.revents & POLLIN))
			continue;
		ssize_t got = read(command_fd, cmd + cmd_len, sizeof cmd - 1 - cmd_len);
		if (got <= 0)
			continue;
		cmd_len += got;
		char *newline;
		while ((newline = memchr(cmd, '\n', cmd_len))) {
			*newline = '\0';
			if (newline > cmd && newline[-1] == '\r')
				newline[-1] = '\0';
			command(command_fd, cmd, &d, seq, max_gap, started);
			size_t used = newline + 1 - cmd;
			memmove(cmd, newline + 1, cmd_len - used);
			cmd_len -= used;
		}
		if (cmd_len == sizeof cmd - 1)
			cmd_len = 0; /* a line too long for any command: dropped */
	}
}
