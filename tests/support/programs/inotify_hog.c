/* Opens inotify instances until the kernel refuses, says how many, then holds them (a sidecar
 * exhausting fs.inotify.max_user_instances for its uid: tests/integration/test_sidecar_uid.py). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>
int main(void) {
    int n = 0;
    for (;;) {
        if (inotify_init1(IN_CLOEXEC) < 0) {
            printf("refused after %d: %s\n", n, strerror(errno));
            fflush(stdout);
            break;
        }
        if (++n >= 100000) break;
    }
    for (;;) pause();
}
