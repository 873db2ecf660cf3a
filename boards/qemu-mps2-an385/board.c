// Lantern QEMU board (mps2-an385, Cortex-M3): time, interrupts, stdin, autorun, heap watch.
//
// The stock qemu port polls its UART and has no clock. This file adds a 1 kHz SysTick (ticks
// and wall clock), an interrupt-driven REPL UART (so Ctrl-C stops running Python, as on a
// real board) and WFI while idle, so an idle node does not spin a host core.

#include <stdint.h>

#include "py/gc.h"
#include "py/mphal.h"
#include "py/runtime.h"
#include "py/builtin.h"
#include "shared/runtime/interrupt_char.h"
#include "shared/runtime/pyexec.h"

// Cortex-M3 system control space
#define SYST_CSR (*(volatile uint32_t *)0xe000e010)
#define SYST_RVR (*(volatile uint32_t *)0xe000e014)
#define SYST_CVR (*(volatile uint32_t *)0xe000e018)
#define SCB_VTOR (*(volatile uint32_t *)0xe000ed08)
#define NVIC_ISER0 (*(volatile uint32_t *)0xe000e100)

#define SYST_CSR_ENABLE (1u << 0)
#define SYST_CSR_TICKINT (1u << 1)
#define SYST_CSR_CLKSOURCE_CPU (1u << 2)

// mps2-an385 runs its core at 25 MHz; one SysTick period is 1 ms
#define CPU_HZ (25000000u)
#define CYCLES_PER_MS (CPU_HZ / 1000u)
#define CYCLES_PER_US (CPU_HZ / 1000000u)
#define NS_PER_CYCLE (1000000000u / CPU_HZ)

// CMSDK APB UART0: the REPL (UART1, the node's link, is driven from Python)
#define UART0_BASE (0x40004000u)
#define UART_DATA(b) (*(volatile uint32_t *)((b) + 0x00))
#define UART_STATE(b) (*(volatile uint32_t *)((b) + 0x04))
#define UART_CTRL(b) (*(volatile uint32_t *)((b) + 0x08))
#define UART_INTCLEAR(b) (*(volatile uint32_t *)((b) + 0x0c))
#define UART_STATE_RXFULL (1u << 1)
#define UART_CTRL_RX_INTEN (1u << 3)
#define UART_INT_RX (1u << 1)
#define UART0_RX_IRQn (0)

#define N_IRQ (32)

// The boot vector table has only the 16 system exceptions; this copy adds the device IRQs.
// VTOR needs the table aligned to its size rounded up to a power of two (48 words -> 256 B).
static uint32_t vectors[16 + N_IRQ] __attribute__((aligned(256)));

extern const uint32_t isr_vector[];
NORETURN void Default_Handler(void);

static volatile uint32_t systick_ms;
static volatile uint32_t rtc_seconds;
static volatile uint32_t rtc_ms;

// Characters typed at the REPL, filled by the UART0 interrupt
#define STDIN_BUF (512u)
static volatile uint8_t stdin_buf[STDIN_BUF];
static volatile uint32_t stdin_head;
static volatile uint32_t stdin_tail;

// Heap figures kept by the collection hook (read by the mps2 module)
size_t mps2_heap_peak;
size_t mps2_heap_live;
size_t mps2_heap_live_peak;
uint32_t mps2_collections;

static void systick_isr(void) {
    systick_ms += 1;
    if (++rtc_ms == 1000) {
        rtc_ms = 0;
        rtc_seconds += 1;
    }
}

static void uart0_rx_isr(void) {
    UART_INTCLEAR(UART0_BASE) = UART_INT_RX;
    while (UART_STATE(UART0_BASE) & UART_STATE_RXFULL) {
        int c = UART_DATA(UART0_BASE) & 0xff;
        if (c == mp_interrupt_char) {
            mp_sched_keyboard_interrupt();
        } else if (stdin_head - stdin_tail < STDIN_BUF) {  // else dropped, as by a UART FIFO
            stdin_buf[stdin_head % STDIN_BUF] = (uint8_t)c;
            stdin_head += 1;
        }
    }
}

static void board_init(void) {
    for (int i = 0; i < 16; ++i) {
        vectors[i] = isr_vector[i];
    }
    for (int i = 16; i < 16 + N_IRQ; ++i) {
        vectors[i] = (uint32_t)&Default_Handler;
    }
    vectors[15] = (uint32_t)&systick_isr;
    vectors[16 + UART0_RX_IRQn] = (uint32_t)&uart0_rx_isr;
    SCB_VTOR = (uint32_t)&vectors[0];
    __asm volatile ("dsb\n isb" ::: "memory");

    SYST_RVR = CYCLES_PER_MS - 1;
    SYST_CVR = 0;
    SYST_CSR = SYST_CSR_ENABLE | SYST_CSR_TICKINT | SYST_CSR_CLKSOURCE_CPU;

    UART_CTRL(UART0_BASE) |= UART_CTRL_RX_INTEN;
    NVIC_ISER0 = 1u << UART0_RX_IRQn;
}

// A consistent (milliseconds, cycles into the current millisecond) pair.
static uint32_t ticks_split(uint32_t *cycles) {
    uint32_t ms, val;
    do {
        ms = systick_ms;
        val = SYST_CVR;
    } while (ms != systick_ms);
    *cycles = CYCLES_PER_MS - 1 - val;
    return ms;
}

mp_uint_t mp_hal_ticks_ms(void) {
    return systick_ms;
}

mp_uint_t mp_hal_ticks_us(void) {
    uint32_t cycles;
    uint32_t ms = ticks_split(&cycles);
    return ms * 1000u + cycles / CYCLES_PER_US;
}

mp_uint_t mp_hal_ticks_cpu(void) {
    uint32_t cycles;
    uint32_t ms = ticks_split(&cycles);
    return ms * CYCLES_PER_MS + cycles;
}

void mp_hal_delay_ms(mp_uint_t ms) {
    uint32_t start = systick_ms;
    for (;;) {
        uint32_t elapsed = systick_ms - start;
        if (elapsed >= ms) {
            break;
        }
        mp_event_wait_ms(ms - elapsed);
    }
}

void mp_hal_delay_us(mp_uint_t us) {
    uint32_t start = mp_hal_ticks_us();
    while (mp_hal_ticks_us() - start < us) {
    }
}

uint32_t mps2_rtc_seconds(void) {
    return rtc_seconds;
}

// Nanoseconds since the epoch (2000-01-01: the board has no battery-backed clock; the node
// sets its own offset from the gateway's ACKs). No 64-bit division: libgcc's would drag in
// unwind tables that collide with .data in the stock linker script.
uint64_t mp_hal_time_ns(void) {
    uint32_t s, ms, cycles, t;
    do {
        t = systick_ms;
        s = rtc_seconds;
        ms = rtc_ms;
        cycles = CYCLES_PER_MS - 1 - SYST_CVR;
    } while (t != systick_ms);
    return (uint64_t)s * 1000000000u + ms * 1000000u + cycles * NS_PER_CYCLE;
}

uint32_t mps2_random_seed(void) {
    uint32_t cycles;
    uint32_t ms = ticks_split(&cycles);
    return ms * 2654435761u ^ cycles;
}

int __wrap_mp_hal_stdin_rx_chr(void) {
    for (;;) {
        if (stdin_tail != stdin_head) {
            int c = stdin_buf[stdin_tail % STDIN_BUF];
            stdin_tail += 1;
            return c;
        }
        // The REPL may wait here with no exception handler active, so only sleep.
        __asm volatile ("wfi");
    }
}

// Bytes in blocks that are not free, from the allocation table: 2 bits per block, 0 = free.
// gc_info() would give the same figure but walks every block (~2 ms of the board's time).
size_t mps2_heap_used(void) {
    const mp_state_mem_area_t *area = &MP_STATE_MEM(area);
    const uint8_t *atb = area->gc_alloc_table_start;
    size_t blocks = 0;
    for (size_t i = 0; i < area->gc_alloc_table_byte_len; ++i) {
        uint32_t b = atb[i];
        b = (b | (b >> 1)) & 0x55;  // one bit per block in use
        b = (b & 0x33) + ((b >> 2) & 0x33);
        blocks += (b & 0x0f) + (b >> 4);
    }
    return blocks * MICROPY_BYTES_PER_GC_BLOCK;
}

void __real_gc_collect(void);

// Heap in use only grows between collections, so its high-water mark is what is in use when
// a collection starts (explicit, by gc.threshold, or forced by a full heap); what survives
// the collection is the live set.
void __wrap_gc_collect(void) {
    size_t used = mps2_heap_used();
    if (used > mps2_heap_peak) {
        mps2_heap_peak = used;
    }
    __real_gc_collect();
    used = mps2_heap_used();
    mps2_heap_live = used;
    if (used > mps2_heap_live_peak) {
        mps2_heap_live_peak = used;
    }
    mps2_collections += 1;
}

void __real_mp_init(void);

// After every (soft) reset: frozen _boot.py mounts the filesystem; then, as on ESP32, boot.py
// and main.py run only when the friendly REPL follows (a raw-REPL soft reset from mpremote
// must come back to its prompt, not into the node's main loop).
void __wrap_mp_init(void) {
    static bool initialised;
    if (!initialised) {
        board_init();
        initialised = true;
    }
    __real_mp_init();
    mps2_heap_peak = 0;
    mps2_heap_live = 0;
    mps2_heap_live_peak = 0;
    mps2_collections = 0;
    pyexec_frozen_module("_boot.py", false);
    if (pyexec_mode_kind != PYEXEC_MODE_FRIENDLY_REPL) {
        return;
    }
    if (mp_import_stat("boot.py") == MP_IMPORT_STAT_FILE) {
        pyexec_file("boot.py");
    }
    // main.py on the filesystem (deployed with mpremote) wins over the frozen one
    if (mp_import_stat("main.py") == MP_IMPORT_STAT_FILE) {
        pyexec_file("main.py");
    } else {
        pyexec_frozen_module("main.py", true);
    }
}
