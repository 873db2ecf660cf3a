// The board's own module, `mps2`: heap figures and the "flash" block device.
//
// The flash is the AN385's second SSRAM bank (0x20000000), outside the linked image and the
// GC heap, like a real board's SPI flash: it keeps its contents across soft resets and is
// blank when QEMU starts. Block size and count mirror an ESP32's 2 MB littlefs partition.

#include <string.h>

#include "py/runtime.h"
#include "py/gc.h"
#include "extmod/vfs.h"

#define FLASH_BASE (0x20000000u)
#define FLASH_BLOCK_SIZE (4096u)
#define FLASH_BLOCKS (512u)

extern size_t mps2_heap_peak;
extern size_t mps2_heap_live;
extern size_t mps2_heap_live_peak;
extern uint32_t mps2_collections;
size_t mps2_heap_used(void);

// heap_stats() -> (heap size, live bytes after the last collection, high-water (most in use
// at any moment), collections, most live bytes after any collection), all since the last reset
static mp_obj_t mps2_heap_stats(void) {
    size_t used = mps2_heap_used();
    size_t peak = used > mps2_heap_peak ? used : mps2_heap_peak;
    const mp_state_mem_area_t *area = &MP_STATE_MEM(area);
    size_t total = (size_t)(area->gc_pool_end - area->gc_pool_start);
    mp_obj_t items[5] = {
        mp_obj_new_int_from_uint(total),
        mp_obj_new_int_from_uint(mps2_heap_live),
        mp_obj_new_int_from_uint(peak),
        mp_obj_new_int_from_uint(mps2_collections),
        mp_obj_new_int_from_uint(mps2_heap_live_peak),
    };
    return mp_obj_new_tuple(5, items);
}
static MP_DEFINE_CONST_FUN_OBJ_0(mps2_heap_stats_obj, mps2_heap_stats);

typedef struct _mps2_flash_obj_t {
    mp_obj_base_t base;
} mps2_flash_obj_t;

static const mp_obj_type_t mps2_flash_type;
static const mps2_flash_obj_t mps2_flash_obj = {{&mps2_flash_type}};

static mp_obj_t mps2_flash_make_new(const mp_obj_type_t *type, size_t n_args, size_t n_kw,
    const mp_obj_t *args) {
    mp_arg_check_num(n_args, n_kw, 0, 0, false);
    return MP_OBJ_FROM_PTR(&mps2_flash_obj);
}

// Address of bytes [offset, offset + len) of a block; raises if that leaves the flash.
static uint8_t *flash_addr(mp_obj_t block_in, mp_obj_t offset_in, size_t len) {
    mp_int_t block = mp_obj_get_int(block_in);
    mp_int_t offset = offset_in == MP_OBJ_NULL ? 0 : mp_obj_get_int(offset_in);
    if (block < 0 || offset < 0 || (mp_uint_t)block >= FLASH_BLOCKS
        || (mp_uint_t)offset + len > (FLASH_BLOCKS - (mp_uint_t)block) * FLASH_BLOCK_SIZE) {
        mp_raise_ValueError(MP_ERROR_TEXT("flash access out of range"));
    }
    return (uint8_t *)(FLASH_BASE + (mp_uint_t)block * FLASH_BLOCK_SIZE + (mp_uint_t)offset);
}

static mp_obj_t mps2_flash_readblocks(size_t n_args, const mp_obj_t *args) {
    mp_buffer_info_t buf;
    mp_get_buffer_raise(args[2], &buf, MP_BUFFER_WRITE);
    memcpy(buf.buf, flash_addr(args[1], n_args > 3 ? args[3] : MP_OBJ_NULL, buf.len), buf.len);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN(mps2_flash_readblocks_obj, 3, 4, mps2_flash_readblocks);

static mp_obj_t mps2_flash_writeblocks(size_t n_args, const mp_obj_t *args) {
    mp_buffer_info_t buf;
    mp_get_buffer_raise(args[2], &buf, MP_BUFFER_READ);
    uint8_t *dst = flash_addr(args[1], n_args > 3 ? args[3] : MP_OBJ_NULL, buf.len);
    if (n_args == 3) {
        // simple interface: whole blocks, erased first, as on a real flash
        memset(dst, 0xff, (buf.len + FLASH_BLOCK_SIZE - 1) / FLASH_BLOCK_SIZE * FLASH_BLOCK_SIZE);
    }
    memcpy(dst, buf.buf, buf.len);
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_VAR_BETWEEN(mps2_flash_writeblocks_obj, 3, 4, mps2_flash_writeblocks);

static mp_obj_t mps2_flash_ioctl(mp_obj_t self_in, mp_obj_t op_in, mp_obj_t arg_in) {
    switch (mp_obj_get_int(op_in)) {
        case MP_BLOCKDEV_IOCTL_INIT:
        case MP_BLOCKDEV_IOCTL_DEINIT:
        case MP_BLOCKDEV_IOCTL_SYNC:
            return MP_OBJ_NEW_SMALL_INT(0);
        case MP_BLOCKDEV_IOCTL_BLOCK_COUNT:
            return MP_OBJ_NEW_SMALL_INT(FLASH_BLOCKS);
        case MP_BLOCKDEV_IOCTL_BLOCK_SIZE:
            return MP_OBJ_NEW_SMALL_INT(FLASH_BLOCK_SIZE);
        case MP_BLOCKDEV_IOCTL_BLOCK_ERASE:
            memset(flash_addr(arg_in, MP_OBJ_NULL, FLASH_BLOCK_SIZE), 0xff, FLASH_BLOCK_SIZE);
            return MP_OBJ_NEW_SMALL_INT(0);
        default:
            return mp_const_none;
    }
}
static MP_DEFINE_CONST_FUN_OBJ_3(mps2_flash_ioctl_obj, mps2_flash_ioctl);

static const mp_rom_map_elem_t mps2_flash_locals_dict_table[] = {
    { MP_ROM_QSTR(MP_QSTR_readblocks), MP_ROM_PTR(&mps2_flash_readblocks_obj) },
    { MP_ROM_QSTR(MP_QSTR_writeblocks), MP_ROM_PTR(&mps2_flash_writeblocks_obj) },
    { MP_ROM_QSTR(MP_QSTR_ioctl), MP_ROM_PTR(&mps2_flash_ioctl_obj) },
};
static MP_DEFINE_CONST_DICT(mps2_flash_locals_dict, mps2_flash_locals_dict_table);

static MP_DEFINE_CONST_OBJ_TYPE(
    mps2_flash_type,
    MP_QSTR_Flash,
    MP_TYPE_FLAG_NONE,
    make_new, mps2_flash_make_new,
    locals_dict, &mps2_flash_locals_dict
    );

static const mp_rom_map_elem_t mps2_module_globals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_mps2) },
    { MP_ROM_QSTR(MP_QSTR_heap_stats), MP_ROM_PTR(&mps2_heap_stats_obj) },
    { MP_ROM_QSTR(MP_QSTR_Flash), MP_ROM_PTR(&mps2_flash_type) },
};
static MP_DEFINE_CONST_DICT(mps2_module_globals, mps2_module_globals_table);

const mp_obj_module_t mps2_module = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&mps2_module_globals,
};

MP_REGISTER_MODULE(MP_QSTR_mps2, mps2_module);
