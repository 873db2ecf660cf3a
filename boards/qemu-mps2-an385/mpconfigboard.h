// Lantern QEMU board configuration, used as MP_CONFIGFILE: the qemu port's settings, then the
// features the node firmware needs (the port's header sets them to 0 unconditionally).
#include "mpconfigport.h"

// time: ticks from SysTick, wall clock from a seconds counter (epoch 2000, as on bare metal)
#undef MICROPY_PY_TIME
#define MICROPY_PY_TIME (1)
#define MICROPY_PY_TIME_GMTIME_LOCALTIME_MKTIME (1)
#define MICROPY_PY_TIME_TIME_TIME_NS (1)
#define MICROPY_PY_TIME_INCLUDEFILE "modtime_board.h"

// select + asyncio: the link UART is polled through its ioctl
#undef MICROPY_PY_SELECT
#define MICROPY_PY_SELECT (1)
#undef MICROPY_PY_ASYNCIO
#define MICROPY_PY_ASYNCIO (1)

#define MICROPY_PY_RANDOM_SEED_INIT_FUNC (mps2_random_seed())

// Sleep until the next interrupt (SysTick every ms, or a character on the REPL UART):
// QEMU then idles the host CPU instead of spinning.
#define MICROPY_INTERNAL_WFE(TIMEOUT_MS) __asm volatile ("wfi")

#ifndef __ASSEMBLER__
#include <stdint.h>
uint32_t mps2_random_seed(void);
#endif
