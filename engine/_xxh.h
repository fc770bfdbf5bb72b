/* Pulls in the vendored xxHash as inline functions, so the extensions need no library. */
#ifndef CONVEYOR_XXH_H
#define CONVEYOR_XXH_H
#define XXH_INLINE_ALL
#include "_vendor/xxhash/xxhash.h"
#endif
